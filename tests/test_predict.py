"""`python -m vit_jax.tools.predict`: images in, top-k classes out, for every checkpoint format."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import FIXTURES, REPO, TINY, random_params
from PIL import Image

import vit_jax
from vit_jax import checkpoints
from vit_jax.interop import input_convention
from vit_jax.tools import predict

TINY = {**TINY, "num_layers": 1}

# fixture → (weights inside it, what the weights do not say)
FORMATS = {
    "vit_jax_token_prelogits": ("params.npz", {}),
    "timm_avg_reg4_layerscale_qknorm": ("model.safetensors", {"num_heads": 4}),
    "hf_vit": (".", {}),
}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The [-1, 1] convention, inverted: what a PNG of a model input holds."""
    return np.round((np.asarray(images) + 1.0) * 127.5).astype(np.uint8)


def write_png(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A tiny grayscale 10-class model saved the way training saves it (Orbax, with its config)."""
    model = vit_jax.create_model(None, **TINY, num_channels=1, num_classes=10)
    params = random_params(model, scale=0.3)
    directory = tmp_path_factory.mktemp("workdir") / "checkpoints"
    manager = checkpoints.TrainCheckpoints(directory, async_save=False)
    manager.save(7, {"params": params, "opt_state": {}, "step": 7}, model.config, {"step": 7})
    manager.close()
    return str(directory), model, params


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory):
    """A tiny 1000-class model as a published vit_jax .npz: its classes default to ImageNet's names."""
    model = vit_jax.create_model(None, **TINY, num_classes=1000)
    params = random_params(model, scale=0.3)
    path = str(tmp_path_factory.mktemp("npz") / "tiny.npz")
    vit_jax.save_pretrained(params, path, format="npz", model=model)
    return path, model, params


def run_main(capsys, *argv):
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parse_output(text: str) -> dict[str, list[tuple[float, str]]]:
    """`path` lines followed by `  rank. prob%  name` lines → {path: [(prob, name), ...]}."""
    result, current = {}, None
    for line in text.splitlines():
        if not line.startswith("  "):
            current = result.setdefault(line, [])
        else:
            _, percent, name = line.split(maxsplit=2)
            current.append((float(percent.rstrip("%")) / 100, name))
    return result


# --- The model path: exact inputs give the source's own probabilities --------------------------------


@pytest.mark.parametrize("fixture", sorted(FORMATS))
def test_predict_reproduces_fixture_probabilities(fixture):
    weights, overrides = FORMATS[fixture]
    model, params = vit_jax.load_pretrained(str(FIXTURES / fixture / weights), **overrides)
    images = np.load(FIXTURES / fixture / "images.npy")
    logits = np.load(FIXTURES / fixture / "logits.npy")
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs, indices = predict.predict(model, params, images, top_k=3, batch_size=3)
    assert probs.shape == indices.shape == (4, 3)
    np.testing.assert_array_equal(indices, np.argsort(-expected, axis=-1, kind="stable")[:, :3])
    np.testing.assert_allclose(probs, np.sort(expected, axis=-1)[:, ::-1][:, :3], atol=1e-5)


# --- Images: files → model inputs ------------------------------------------------------------------


def test_png_of_a_model_input_reads_back_as_that_input(tmp_path):
    images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1))
    paths = [write_png(tmp_path / f"{i}.png", to_uint8(x)) for i, x in enumerate(images)]
    loaded = predict.load_images(paths, (16, 16), channels=3)
    assert loaded.shape == (2, 16, 16, 3) and loaded.dtype == np.float32
    # Same size: no resampling, only the uint8 rounding of the PNG.
    np.testing.assert_allclose(loaded, images, atol=0.5 / 127.5 + 1e-6)


def test_images_are_resized_and_converted_to_the_checkpoint_channels(tmp_path):
    gray = write_png(tmp_path / "gray.png", np.full((40, 24, 1), 255, np.uint8))
    rgb = write_png(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    as_rgb = predict.load_images([gray], (16, 16), channels=3)
    np.testing.assert_allclose(as_rgb, 1.0, atol=1e-5)
    assert as_rgb.shape == (1, 16, 16, 3)
    as_gray = predict.load_images([rgb], (32, 32), channels=1)
    np.testing.assert_allclose(as_gray, -1.0, atol=1e-5)
    assert as_gray.shape == (1, 32, 32, 1)
    np.testing.assert_array_equal(
        input_convention.match_channels(np.array([[[255, 0, 0]]], np.uint8), 1), [[[76]]]
    )


# --- Class names -----------------------------------------------------------------------------------


def test_imagenet_names_come_from_the_installed_tensorflow_datasets():
    names = predict.imagenet_labels()
    assert len(names) == 1000
    assert names[0].startswith("tench") and names[1].startswith("goldfish")
    assert names[281].startswith("tabby") and names[999].startswith("toilet tissue")


def test_label_names_defaults_and_files(tmp_path):
    assert predict.label_names(None, 10) == [str(i) for i in range(10)]
    assert predict.label_names(None, 1000)[0].startswith("tench")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert predict.label_names(str(labels), 2) == ["cat", "dog"]
    with pytest.raises(ValueError, match="names 2 classes but the checkpoint's head has 3"):
        predict.label_names(str(labels), 3)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        predict.label_names(str(tmp_path / "nope.txt"), 3)
    # A Hugging Face folder's own names win; its placeholders LABEL_i do not.
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "ant", "1": "bee"}}))
    assert predict.label_names(None, 2, str(tmp_path)) == ["ant", "bee"]
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0"}}))
    assert predict.label_names(None, 1, str(tmp_path)) == ["0"]


# --- The command line ------------------------------------------------------------------------------


def test_cli_on_a_training_checkpoint_prints_digits(digits_checkpoint, tmp_path, capsys):
    directory, model, params = digits_checkpoint
    pixels = np.asarray(jax.random.randint(jax.random.key(1), (2, 16, 16, 1), 0, 256), np.uint8)
    paths = [write_png(tmp_path / f"digit{i}.png", x) for i, x in enumerate(pixels)]
    code, out, err = run_main(capsys, "--checkpoint", directory, "--top_k", 3, *paths)
    assert code == 0, err
    printed = parse_output(out)
    assert list(printed) == paths
    expected_probs, expected_indices = predict.predict(model, params, (pixels - 127.5) / 127.5, 3)
    for path, probs, indices in zip(paths, expected_probs, expected_indices):
        assert [name for _, name in printed[path]] == [str(i) for i in indices]
        np.testing.assert_allclose([p for p, _ in printed[path]], probs, atol=5e-5)


def test_cli_names_imagenet_classes_and_reads_label_files(imagenet_checkpoint, tmp_path, capsys):
    path, _, _ = imagenet_checkpoint
    image = write_png(tmp_path / "x.png", np.full((20, 30, 3), 128, np.uint8))
    code, out, err = run_main(capsys, "--checkpoint", path, "--top_k", 2, image)
    assert code == 0, err
    (ranked,) = parse_output(out).values()
    assert len(ranked) == 2
    names = predict.imagenet_labels()
    name, index = ranked[0][1].rsplit("  [", 1)
    assert names[int(index.rstrip("]"))] == name
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(1000)))
    code, out, _ = run_main(capsys, "--checkpoint", path, "--labels", labels, "--top_k", 1, image)
    assert code == 0 and "class" in out


def test_cli_as_a_module_with_overrides(tmp_path):
    fixture = FIXTURES / "timm_token"
    image = write_png(tmp_path / "x.png", to_uint8(np.load(fixture / "images.npy")[0]))
    argv = ["--checkpoint", fixture / "model.safetensors", "--set", "num_heads=4", "--top_k", 10]
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.predict", *map(str, argv), image],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # What had to be guessed is one plain line (not Python's 'WARNING:vit_jax:' default).
    assert result.stderr.startswith(f"WARNING: {fixture / 'model.safetensors'}: guessed the input")
    (ranked,) = parse_output(result.stdout).values()
    assert sorted(name for _, name in ranked) == [str(i) for i in range(10)]
    assert sum(p for p, _ in ranked) == pytest.approx(1.0, abs=1e-3)
    # The PNG holds the fixture's input up to uint8 rounding, so the source's answer comes back.
    logits = np.load(fixture / "logits.npy")[0]
    assert ranked[0][1] == str(int(np.argmax(logits)))


# --- Bad input: one clear error naming the file ------------------------------------------------------


def test_missing_image_is_named_before_the_checkpoint_is_read(tmp_path, capsys):
    missing = tmp_path / "missing.png"
    code, out, err = run_main(capsys, "--checkpoint", tmp_path / "no_checkpoint", missing)
    assert code == 1 and not out
    assert str(missing) in err and "does not exist" in err


def test_a_file_that_is_not_an_image_is_named(digits_checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, _, err = run_main(capsys, "--checkpoint", digits_checkpoint[0], text)
    assert code == 1
    assert str(text) in err and "not an image file" in err


def test_missing_checkpoint_is_named(tmp_path, capsys):
    image = write_png(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    code, _, err = run_main(capsys, "--checkpoint", tmp_path / "nowhere.npz", image)
    assert code == 1 and "nowhere.npz" in err


def test_bad_flags_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", "x", "--top_k", "0", "y.png"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", "x", "--set", "num_heads", "y.png"])
    assert "expected FIELD=VALUE" in capsys.readouterr().err
