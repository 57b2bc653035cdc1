"""The seed's two steps, offline and tiny: pre-train on generated fractals (`configs/pretrain.py`'s
fractaldb recipe), then fine-tune that checkpoint on digits through `train.py` (`configs/
finetune.py:...,digits`): head replaced for 10 classes, position embeddings resized 16 -> 32 px."""

import subprocess

import numpy as np
import pytest
from helpers import REPO, load_config, subprocess_env, train_py

TINY_MODEL = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1)
KERNEL = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"


def flat(params) -> dict:
    from flax import traverse_util

    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The fractal recipe shrunk: 4 classes at 16 px, a 1-layer width-32 ViT/4, 3 steps."""
    from vit_jax.train import trainer

    config = load_config("configs/pretrain.py", "ViT-Ti/4,fractaldb/c4_i6_r16")
    assert config.image_size == 16 and config.model.representation_size == 192
    config.model.update(dict(TINY_MODEL, representation_size=32))
    config.data_dir = str(tmp_path_factory.mktemp("fractal_data"))
    config.update(dict(batch_size=8, eval_batch_size=4, total_epochs=None, total_steps=3))
    config.update(dict(log_every_steps=1, checkpoint_every_steps=3))
    workdir = str(tmp_path_factory.mktemp("fractal_pretrain") / "workdir")
    trainer.train_and_evaluate(config, workdir)
    return workdir


def test_pretrain_then_finetune_on_digits_through_train_py(pretrained, tmp_path, digits_data_dir):
    from vit_jax.interop import load

    workdir = tmp_path / "finetune"
    model = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
    command = train_py(
        "configs/finetune.py:ViT-Ti/4,digits",
        workdir,
        digits_data_dir,
        f"--config.init_from={pretrained}",
        "--config.total_steps=3",
        "--config.batch_size=32",
        *model,
    )
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Initialized from {pretrained}" in result.stdout
    source, tuned = load.load_checkpoint(pretrained), load.load_checkpoint(str(workdir))
    assert source.config.num_classes == 4 and tuned.config.num_classes == 10
    assert tuned.config.image_size == (32, 32) and tuned.config.representation_size is None
    before, after = flat(source.params), flat(tuned.params)
    assert before["Transformer/posembed_input/pos_embedding"].shape == (1, 1 + 4 * 4, 32)
    assert after["Transformer/posembed_input/pos_embedding"].shape == (1, 1 + 8 * 8, 32)
    assert after["head/kernel"].shape == (32, 10) and "pre_logits/kernel" not in after
    # The encoder came from the fractal checkpoint: 3 small SGD steps away from it (lr <= 0.01,
    # clipped gradients), while two random inits differ by the init's own scale.
    moved = np.abs(after[KERNEL] - before[KERNEL]).max()
    assert moved < 0.05 < np.abs(before[KERNEL]).max()
