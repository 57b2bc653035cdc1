"""A model exported as a serialized StableHLO program (`interop/stablehlo`) runs without the Flax
model: one file serves every batch size and gives our logits; bad destinations write nothing."""

import json
import pathlib

import numpy as np
import pytest
from helpers import TINY, random_params

import vit_jax
from vit_jax.interop import stablehlo


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = vit_jax.create_model(None, num_classes=10, pool="map", num_registers=2, **TINY)
    params = random_params(model)
    path = str(tmp_path_factory.mktemp("hlo") / "model.stablehlo")
    stablehlo.export_stablehlo(params, model.config, path, labels=[str(i) for i in range(10)])
    return model, params, path


@pytest.mark.parametrize("batch", [1, 3])
def test_one_file_gives_our_logits_for_any_batch(exported, batch):
    model, params, path = exported
    program, meta = stablehlo.load_stablehlo(path)
    images = np.random.default_rng(batch).uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)
    ours = model.apply({"params": params}, images)
    np.testing.assert_allclose(program.call(images), ours, atol=1e-4)
    assert meta["input"]["image_size"] == [16, 16] and meta["labels"][3] == "3"


def test_bad_destinations_are_refused_before_anything_is_written(exported, tmp_path):
    model, params, path = exported
    before = pathlib.Path(path).read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        stablehlo.export_stablehlo(params, model.config, path)
    with pytest.raises(ValueError, match=r"writes a \.stablehlo file"):
        stablehlo.export_stablehlo(params, model.config, str(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="2 labels for a model of 10 classes"):
        stablehlo.export_stablehlo(
            params, model.config, str(tmp_path / "m.stablehlo"), labels=["a", "b"]
        )
    assert pathlib.Path(path).read_bytes() == before and not list(tmp_path.iterdir())
    assert json.loads(pathlib.Path(path + ".json").read_text())["format"] == "stablehlo"
