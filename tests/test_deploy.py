"""Deployment (`vit_jax.interop.deploy`): every exported file, run in its own runtime (onnxruntime,
tf.saved_model.load, the LiteRT interpreter, jax.export), gives our logits for batch 1 and 3 from one
file (TFLite: one file per static batch); with the preprocessing inside, `predict` on PNGs prints
the same classes as for the JAX checkpoint; int8 TFLite keeps the digits' top-1; bad input is
refused before anything is written.

The models cover the options between them: MAP pooling + registers + LayerScale + qk-norm on a
non-square 4x6 patch grid (every format), gap pooling with sin-cos position embeddings (ONNX and
TFLite, the two exporters that translate ops: SavedModel and StableHLO run jax.export's own program,
which the first model checks) and the digits model (the trained tiny recipe: class token, grayscale
digits as RGB, white-on-black polarity; every format with the preprocessing inside). Exports take
seconds each, so the files are made once per module and shared.
"""

import os
import pathlib

import numpy as np
import pytest
from helpers import TINY, random_params
from PIL import Image

import vit_jax
from vit_jax.interop import deploy, load
from vit_jax.interop.deploy import common, stablehlo
from vit_jax.interop.input_convention import read_image
from vit_jax.tools import convert, predict

DESTINATIONS = {
    "onnx": "model.onnx",
    "savedmodel": "model_savedmodel",
    "tflite": "model.tflite",
    "stablehlo": "model.stablehlo",
}
OPTIONS = dict(pool="map", num_registers=2, layerscale_init=0.1, qk_norm=True, image_size=(16, 24))
GAP = dict(pool="gap", posemb="sincos2d", num_layers=1)


def export_all(params, config, folder, formats=tuple(DESTINATIONS), labels=None):
    """{format: [files]} (TFLite: a batch-1 and a batch-3 file)."""
    files = {}
    for format in formats:
        name = DESTINATIONS[format]
        batches = (1, 3) if format == "tflite" else (None,)
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
            batches = [runner.static_batch] if runner.static_batch else [1, 3]
            for batch in batches:
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


def test_gap_pooling_through_the_op_translating_exporters(tmp_path):
    model = vit_jax.create_model(None, num_classes=10, **{**TINY, **GAP})
    params = random_params(model)
    files = export_all(params, model.config, tmp_path, ("onnx", "tflite"))
    check_logits(model, params, files, random_inputs(model.config))


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
    """Each file with the preprocessing inside, made by the command line, fed the pixels of the
    PNGs (one dark-on-light, inverted inside): its logits for 1 and 3 images are ours for the same
    PNGs preprocessed in Python, and predict gives the same top-5 and probabilities (the command
    line for ONNX against the command line for the JAX checkpoint; the others through the same
    `predict_deployed`, in the runtime already loaded)."""
    loaded, _, pngs, checkpoint = digits
    model = vit_jax.VisionTransformer(loaded.config)
    raw = [read_image(p) for p in pngs]
    pixels = np.stack([np.repeat(p, 3, axis=-1) for p in raw])  # the RGB model's channels
    inputs = np.stack([loaded.preprocessing.apply(p, loaded.config.image_size, 3) for p in raw])
    ours = np.asarray(model.apply({"params": loaded.params}, inputs))
    want_probs, want_classes = predict.predict(model, loaded.params, inputs, top_k=5)
    code, expected, err = run_cli(predict.main, capsys, "--checkpoint", checkpoint, *pngs)
    assert code == 0 and "1.png: inverted" in err, err
    for format, name in DESTINATIONS.items():
        path = tmp_path / name
        size = ["--input_size", "8,8"] if format in ("onnx", "tflite") else []
        argv = [checkpoint, path, "--to", format, "--with_preprocessing", *size]
        code, out, err = run_cli(convert.main, capsys, *argv)
        assert code == 0 and "uint8 pixels" in out, err
        runner = deploy.load(str(path))
        assert runner.meta["input"]["dtype"] == "uint8"
        for batch in (1, 3):  # TFLite: its batch-1 file, fed one image at a time
            np.testing.assert_allclose(runner(pixels[:batch]), ours[:batch], atol=1e-4)
        probs, classes = predict.predict_deployed(runner, raw, pngs, top_k=5)
        np.testing.assert_array_equal(classes, want_classes, err_msg=format)
        np.testing.assert_allclose(probs, want_probs, atol=1e-4, err_msg=format)
    code, out, err = run_cli(predict.main, capsys, "--checkpoint", tmp_path / "model.onnx", *pngs)
    assert code == 0, err
    (names, probs), (want_names, want) = predict_lines(out), predict_lines(expected)
    assert names == want_names and len(names) == 3 * 5
    np.testing.assert_allclose(probs, want, atol=1e-4)  # printed with 2 decimals of a percent


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
