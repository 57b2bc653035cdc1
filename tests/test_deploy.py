"""Deployment (`vit_jax.interop.deploy`): every exported file, run in its own runtime (onnxruntime,
tf.saved_model.load, the LiteRT interpreter, jax.export), gives our logits for batch 1 and 3 from one
file (TFLite: one file per static batch); with the preprocessing inside, `predict` on PNGs prints
the same classes as for the JAX checkpoint; int8 TFLite keeps the digits' top-1; bad input is
refused before anything is written.

The models cover the options between them, each through every format: MAP pooling + registers +
LayerScale + qk-norm on a non-square 4x6 patch grid, gap pooling with sin-cos position embeddings,
token pooling, and the digits model (the trained tiny recipe: class token, grayscale digits as RGB,
white-on-black polarity; with the preprocessing inside, PNGs of four sizes through one file each).
ONNX and TFLite files with the preprocessing inside take uint8 images of any size through their own
resize ops, checked against the JAX preprocessing for sizes up, down and the model's own. Exports
take seconds each, so the files are made once per test and shared by its checks.
"""

import os
import pathlib

import jax
import numpy as np
import pytest
from helpers import TINY, random_params
from PIL import Image

import vit_jax
from vit_jax.interop import deploy, load
from vit_jax.interop.deploy import common, stablehlo
from vit_jax.interop.input_convention import Preprocessing, read_image
from vit_jax.tools import convert, predict

DESTINATIONS = {
    "onnx": "model.onnx",
    "savedmodel": "model_savedmodel",
    "tflite": "model.tflite",
    "stablehlo": "model.stablehlo",
}
OPTIONS = dict(pool="map", num_registers=2, layerscale_init=0.1, qk_norm=True, image_size=(16, 24))
GAP = dict(pool="gap", posemb="sincos2d", num_layers=1)
TOKEN = dict(pool="token", num_layers=1)


def export_all(params, config, folder, labels=None, tflite_batches=(1, 3)):
    """{format: [files]} (TFLite: a file per static batch in `tflite_batches`)."""
    files = {}
    for format in DESTINATIONS:
        name = DESTINATIONS[format]
        batches = tflite_batches if format == "tflite" else (None,)
        files[format] = []
        for batch in batches:
            path = str(folder / (f"b{batch}_{name}" if batch else name))
            deploy.export(params, config, path, format, batch=batch, labels=labels)
            files[format].append(path)
    return files


def check_logits(model, params, files, images):
    ours = np.asarray(model.apply({"params": params}, images))
    for paths in files.values():
        for path in paths:
            runner = deploy.load(path)
            for batch in (1, 3):  # a static-batch file: fed in chunks, the last one padded
                got = runner(images[:batch])
                np.testing.assert_allclose(got, ours[:batch], atol=1e-4, err_msg=path)


@pytest.fixture(scope="module")
def options_model():
    model = vit_jax.create_model(None, num_classes=10, **{**TINY, **OPTIONS})
    return model, random_params(model)


def random_inputs(config):
    shape = (3, *config.image_size, config.num_channels)
    return np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)


def test_every_format_gives_our_logits_for_batch_1_and_3(options_model, tmp_path):
    model, params = options_model
    files = export_all(params, model.config, tmp_path, labels=[f"class {i}" for i in range(10)])
    check_logits(model, params, files, random_inputs(model.config))
    for paths in files.values():  # the convention travels inside each file
        meta = deploy.load(paths[0]).meta
        assert meta["config"] == model.config.to_dict() and meta["format"] in DESTINATIONS
        assert meta["labels"][3] == "class 3" and meta["preprocessing"]["mean"] == [0.5] * 3
    assert deploy.load(files["savedmodel"][0]).meta["input"]["shape"] == [-1, 16, 24, 3]
    program, meta = stablehlo.load_stablehlo(files["stablehlo"][0])  # jax alone reads it
    assert str(program.in_avals[0].shape[0]) == "b" and meta["format"] == "stablehlo"
    assert deploy.load(files["tflite"][1]).meta["input"]["shape"] == [3, 16, 24, 3]


@pytest.mark.parametrize("options", [GAP, TOKEN], ids=["gap_sincos", "token"])
def test_gap_and_token_pooling_through_every_format(options, tmp_path):
    model = vit_jax.create_model(None, num_classes=10, **{**TINY, **options})
    params = random_params(model)
    files = export_all(params, model.config, tmp_path, tflite_batches=(3,))  # 1: padded to 3
    check_logits(model, params, files, random_inputs(model.config))


# --- Pixels of any size: the format's own resize ahead of the model -------------------------------

# Everything the in-graph preprocessing does: inversion per image, BGR, per-channel mean/std.
PIXELS = Preprocessing(
    mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), channel_order="BGR", polarity="white_on_black"
)
# Up, down (both axes, and one up one down), the model's own 16x24, a single pixel.
SIZES = [(5, 7), (16, 24), (64, 48), (31, 17), (1, 1)]


def test_onnx_and_tflite_take_pixels_of_any_size_from_one_file(options_model, tmp_path):
    """One file each (TFLite: static batch 3, a batch of 1 padded), fed uint8 images of several
    sizes in batches of 1 and 3 (one of them dark-on-light, inverted inside): the JAX
    preprocessing + model's logits (`common.forward`, jax.image.resize's filter)."""
    model, params = options_model
    config = model.config
    ours = jax.jit(common.forward(params, config, PIXELS, common.Options(True))[0])
    files = {"onnx": tmp_path / "any.onnx", "tflite": tmp_path / "any.tflite"}
    for format, path in files.items():
        batch = 3 if format == "tflite" else None
        deploy.export(params, config, str(path), format, PIXELS, with_preprocessing=True,
                      batch=batch)  # fmt: skip
    runners = {format: deploy.load(str(path)) for format, path in files.items()}
    assert runners["onnx"].meta["input"]["shape"] == [-1, -1, -1, 3]
    assert runners["tflite"].meta["input"]["shape"] == [3, -1, -1, 3]
    rng = np.random.default_rng(0)
    worst = dict.fromkeys(runners, 0.0)
    for size in SIZES:
        pixels = rng.integers(0, 256, (3, *size, 3), dtype=np.uint8)
        pixels[1] = 255 - pixels[1] // 4  # a light border: inverted
        for batch in (1, 3):
            want = np.asarray(ours(pixels[:batch]))
            for format, runner in runners.items():
                got = runner(pixels[:batch])
                np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{format} {size}")
                worst[format] = max(worst[format], float(np.abs(got - want).max()))
    print(
        "any-size pixels, max |logits - JAX|:", ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    )


# --- The digits model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tiny_workdir, digits_data_dir, tmp_path_factory):
    """The tests' trained tiny digits model (conftest's run, shared), its checkpoint, its test
    split, and PNGs of some test digits (three of them dark-on-light, which the white-on-black
    model inverts). Three steps leave its logits close together: a hard case for int8."""
    import tensorflow_datasets as tfds

    checkpoint = os.path.join(tiny_workdir, "checkpoints")
    loaded = load.load_checkpoint(checkpoint)
    test = tfds.as_numpy(
        tfds.builder("digits", data_dir=digits_data_dir).as_dataset("test", batch_size=-1)
    )
    folder = tmp_path_factory.mktemp("digits_png")
    pngs = []
    for i, image in enumerate(test["image"][:3]):
        pixels = 255 - image if i == 1 else image
        pngs.append(str(folder / f"{i}.png"))
        Image.fromarray(pixels[..., 0]).save(pngs[-1])
    return loaded, test["image"], pngs, checkpoint


def run_cli(main, capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # a usage mistake: argparse exits 2
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_digits_files_take_pixels_give_our_logits_and_predict_the_same_classes(
    digits, tmp_path, capsys
):
    """Each file with the preprocessing inside, made by the command line (every format now takes
    uint8 images of any size), fed the pixels of the PNGs (one dark-on-light, inverted inside):
    its logits for 1 and 3 images are ours for the same PNGs preprocessed in Python, and predict
    gives the same top-5 and probabilities (the command line for ONNX against the command line for
    the JAX checkpoint; the others through the same `predict_deployed`, in the runtime already
    loaded). The same for the digits saved at three other sizes (up, the model's own, down), all
    through the same files; a file of a fixed `--input_size` refuses a PNG of another size."""
    loaded, _, pngs, checkpoint = digits
    model = vit_jax.VisionTransformer(loaded.config)
    sizes = {(8, 8): pngs}  # (height, width) → three PNGs
    for height, width in ((11, 13), (16, 16), (40, 24)):
        sizes[height, width] = []
        for png in pngs:
            sizes[height, width].append(str(tmp_path / f"{height}x{width}_{os.path.basename(png)}"))
            Image.open(png).resize((width, height), Image.BILINEAR).save(sizes[height, width][-1])
    everything = [p for group in sizes.values() for p in group]
    raw = {size: [read_image(p) for p in group] for size, group in sizes.items()}
    inputs = {size: np.stack([loaded.preprocessing.apply(p, loaded.config.image_size, 3)
                              for p in images]) for size, images in raw.items()}  # fmt: skip
    ours = {
        size: np.asarray(model.apply({"params": loaded.params}, x)) for size, x in inputs.items()
    }
    want_probs, want_classes = predict.predict(
        model, loaded.params, np.concatenate(list(inputs.values())), top_k=5
    )
    code, expected, err = run_cli(predict.main, capsys, "--checkpoint", checkpoint, *everything)
    assert code == 0 and "1.png: inverted" in err, err
    for format, name in DESTINATIONS.items():
        path = tmp_path / name
        argv = [checkpoint, path, "--to", format, "--with_preprocessing"]
        code, out, err = run_cli(convert.main, capsys, *argv)
        assert code == 0 and "uint8 pixels" in out, err
        runner = deploy.load(str(path))
        assert runner.meta["input"]["dtype"] == "uint8" and runner.meta["input"]["shape"][1:3] == [
            -1,
            -1,
        ]
        for size, images in raw.items():
            pixels = np.stack(
                [np.repeat(p, 3, axis=-1) for p in images]
            )  # the RGB model's channels
            for batch in (1, 3):  # TFLite: its batch-1 file, fed one image at a time
                got = runner(pixels[:batch])
                np.testing.assert_allclose(
                    got, ours[size][:batch], atol=1e-4, err_msg=f"{format} {size}"
                )
        every = [p for images in raw.values() for p in images]
        probs, classes = predict.predict_deployed(runner, every, everything, top_k=5)
        np.testing.assert_array_equal(classes, want_classes, err_msg=format)
        np.testing.assert_allclose(probs, want_probs, atol=1e-4, err_msg=format)
    code, out, err = run_cli(
        predict.main, capsys, "--checkpoint", tmp_path / "model.onnx", *everything
    )
    assert code == 0, err
    (names, probs), (want_names, want) = predict_lines(out), predict_lines(expected)
    assert names == want_names and len(names) == 12 * 5
    np.testing.assert_allclose(probs, want, atol=1e-4)  # printed with 2 decimals of a percent
    fixed = tmp_path / "fixed.onnx"  # --input_size: jax2onnx traces the JAX preprocessing itself
    argv = [checkpoint, fixed, "--to", "onnx", "--with_preprocessing", "--input_size", "8,8"]
    assert run_cli(convert.main, capsys, *argv)[0] == 0
    runner = deploy.load(str(fixed))
    assert runner.meta["input"]["shape"] == [-1, 8, 8, 3]
    pixels = np.stack([np.repeat(p, 3, axis=-1) for p in raw[8, 8]])
    np.testing.assert_allclose(runner(pixels), ours[8, 8], atol=1e-4)
    with pytest.raises(ValueError, match="is 16x16; this file takes 8x8 images"):
        predict.predict_deployed(runner, raw[16, 16], sizes[16, 16])


def predict_lines(text):
    """(the names, their probabilities) of predict's `  rank. prob%  name` lines, in order."""
    ranked = [line.split() for line in text.splitlines() if line.startswith("  ")]
    return [r[2] for r in ranked], [float(r[1].rstrip("%")) / 100 for r in ranked]


def test_int8_tflite_keeps_the_top1_of_the_float_model(digits, tmp_path):
    loaded, images, _, _ = digits
    config, pre = loaded.config, loaded.preprocessing
    inputs = np.stack([pre.apply(p, config.image_size, 3) for p in images])
    path = str(tmp_path / "digits_int8.tflite")
    deploy.export(loaded.params, config, path, "tflite", pre, quantize="dynamic_int8", batch=40)
    quantized = deploy.load(path)(inputs)
    ours = np.asarray(vit_jax.VisionTransformer(config).apply({"params": loaded.params}, inputs))
    agreement = float(np.mean(quantized.argmax(-1) == ours.argmax(-1)))
    print(f"int8 TFLite top-1 agreement with the float model: {agreement:.2%} of {len(images)}")
    assert len(images) == 360 and agreement >= 0.99
    float_path = str(tmp_path / "digits_f32.tflite")
    deploy.export(loaded.params, config, float_path, "tflite", pre, batch=40)
    assert os.path.getsize(path) < os.path.getsize(float_path)


# --- Bad input: one clear line, nothing written ----------------------------------------------------


@pytest.fixture(scope="module")
def small(options_model, tmp_path_factory):
    model, params = options_model
    path = str(tmp_path_factory.mktemp("small") / "params.npz")
    vit_jax.save_pretrained(params, path, format="npz", model=model)
    return path, model


def test_bad_requests_are_refused_before_anything_is_written(small, tmp_path, capsys):
    src, model = small
    existing = tmp_path / "there.onnx"
    existing.write_bytes(b"mine")
    cases = [
        (["x.onnx", "--to", "caffe"], 2, "invalid choice: 'caffe'"),
        (["x.tflite", "--to", "onnx"], 1, "format 'onnx' writes a .onnx file, not a .tflite file"),
        (["x.onnx", "--to", "savedmodel"], 1, "writes a folder, not a .onnx file"),
        (["x.onnx", "--to", "npz"], 1, "format 'npz' does not write a .onnx file"),
        ([existing, "--to", "onnx"], 1, "already exists; refusing to overwrite it"),
        (["x.onnx", "--to", "onnx", "--quantize", "dynamic_int8"], 1, "cannot express quantize"),
        (["x.onnx", "--to", "onnx", "--set", "dtype=bfloat16"], 1, "express dtype='bfloat16'"),
        (["x.npz", "--to", "npz", "--with_preprocessing"], 2, "only for --to"),
        (["x.onnx", "--to", "onnx", "--input_size", "8,8"], 1, "needs with_preprocessing"),
    ]
    for argv, status, message in cases:
        code, _, err = run_cli(
            convert.main, capsys, src, *[tmp_path / a for a in argv[:1]], *argv[1:]
        )
        assert code == status and message in err, (argv, err)
        assert err.strip().count("\n") <= 1 + (status == 2), err  # one line (argparse: usage too)
    with pytest.raises(ValueError, match="2 labels for a model of 10 classes"):
        deploy.export(load.load_checkpoint(src).params, model.config, str(tmp_path / "m.onnx"),
                      "onnx", labels=["a", "b"])  # fmt: skip
    assert existing.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.onnx"]


def test_a_missing_exporter_or_runtime_is_named(small, tmp_path, monkeypatch, capsys):
    src, _ = small
    real = common.importlib.import_module

    def without(name, *args):
        if name.split(".")[0] in ("jax2onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(common.importlib, "import_module", without)
    code, _, err = run_cli(convert.main, capsys, src, tmp_path / "m.onnx", "--to", "onnx")
    assert code == 1 and "needs the package 'jax2onnx'" in err and "pip install" in err, err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ImportError, match="needs the package 'onnxruntime' to run it"):
        deploy.load(str(tmp_path / "m.onnx"))


def test_a_failed_export_leaves_no_partial_folder(small, tmp_path, monkeypatch):
    src, model = small
    params = load.load_checkpoint(src).params
    import tensorflow as tf

    def fails(module, folder, **kwargs):
        pathlib.Path(folder).mkdir(parents=True)
        (pathlib.Path(folder) / "saved_model.pb").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", fails)
    with pytest.raises(OSError, match="disk full"):
        deploy.export(params, model.config, str(tmp_path / "sm"), "savedmodel")
    assert not list(tmp_path.iterdir())


def test_benchmark_rows_time_a_runtime_beside_jax():
    from vit_jax.tools.bench import runtimes

    with pytest.raises(ValueError, match="'caffe' is not one of"):
        runtimes.check(["onnx", "caffe"])
    config = vit_jax.get_config(None, num_classes=10, **{**TINY, "num_layers": 1})
    (row,) = runtimes.measure(config, 2, ["onnx"], steps=1, repeats=1)
    assert row["runtime"] == "onnx" and row["images_per_s"] > 0 and row["jax_images_per_s"] > 0
    assert row["file_mb"] > 0 and "onnx" in runtimes.format_rows([row], "tiny")
