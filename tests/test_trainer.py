"""The training loop end to end: accumulation, resume, preemption, NaN, fine-tuning, 1 vs 8 devices.

Most runs use a small in-memory dataset that keeps the input pipeline's contract (restartable
`train_iter(start_step)`, padded and masked `eval_iter()`), so they test the trainer alone and fast;
the digits and mock cifar10 runs go through the real TFDS pipeline.
"""

import json
import os
import re
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, REPO, run_with_devices, tiny_recipe

from configs import common
from vit_jax import checkpoints, sharding, trained
from vit_jax.model import vit
from vit_jax.train import checks, evaluation, loss_watch, optim, plan, trainer
from vit_jax.train import state as train_state
from vit_jax.train import step as train_step


class FakeData:
    """Class prototypes plus noise; batch `step` is a pure function of (seed, step)."""

    def __init__(self, config, num_classes=10, nan_at_step=None, on_batch=None):
        self.num_classes = num_classes
        self.num_train_examples = 320
        self.num_eval_examples = 37  # not a multiple of the eval batch: exercises the mask
        self.image_shape = (config.image_size, config.image_size, 3)
        self.batch_size, self.eval_batch_size = config.batch_size, config.eval_batch_size
        self.seed, self.nan_at_step, self.on_batch = config.seed, nan_at_step, on_batch
        rng = np.random.default_rng(1234)
        self.prototypes = rng.uniform(-1, 1, (num_classes, *self.image_shape)).astype(np.float32)

    def _examples(self, n, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, self.num_classes, n)
        noise = rng.normal(0, 0.5, (n, *self.image_shape)).astype(np.float32)
        images = np.clip(self.prototypes[labels] + noise, -1, 1)
        return images, np.eye(self.num_classes, dtype=np.float32)[labels]

    def train_iter(self, start_step=0):
        step = start_step
        while True:
            if self.on_batch:
                self.on_batch(step)
            images, labels = self._examples(self.batch_size, (self.seed, step))
            if step == self.nan_at_step:
                images[0] = np.nan
            yield {"image": images, "label": labels}
            step += 1

    def eval_iter(self):
        images, labels = self._examples(self.num_eval_examples, (self.seed, 10**6))
        b = self.eval_batch_size
        for start in range(0, len(images), b):
            x, y = images[start : start + b], labels[start : start + b]
            pad = b - len(x)
            yield {
                "image": np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))),
                "label": np.pad(y, ((0, pad), (0, 0))),
                "mask": np.concatenate([np.ones(len(x)), np.zeros(pad)]).astype(np.float32),
            }


def tiny_config(**overrides):
    """The tiny recipe (configs/digits.py:tiny) as these tests run it: batches from the host (FakeData
    stands in for the pipeline), one step per dispatch, 12 steps of 16, a checkpoint only at the
    end, lr 3e-3 after 2 warmup steps; then `overrides` (field=value, 'a.b' for nested ones)."""
    config = tiny_recipe()
    config.data_on_device = False
    config.steps_per_dispatch = 1
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 12
    config.checkpoint_every_steps = 0
    config.optim.learning_rate = 3e-3
    config.schedule.warmup_steps = 2
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


# --- The train step --------------------------------------------------------------------------


def test_accumulated_micro_batches_equal_the_large_batch():
    model = vit.VisionTransformer(
        plan.vit_config_for(tiny_config(), num_classes=10, num_channels=3)
    )
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    config = tiny_config()
    tx, _ = optim.make_optimizer(config.optim, config.schedule, vit.param_shapes(model), 12)
    shapes = train_state.state_shapes(model, tx)
    shardings = sharding.tree_shardings(shapes, mesh, 2**14)
    batch = next(FakeData(config).train_iter())
    results = {}
    for accum in (1, 4):
        state = train_state.init_state(model, tx, shardings, jax.random.key(0))
        step = train_step.make_train_step(model, tx, mesh, shardings, accum_steps=accum)
        for _ in range(2):  # the second step also checks the optimizer state matches
            state, metrics = step(state, sharding.make_global_batch(batch, mesh))
        results[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]), state["params"])
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-4)
    for big, accumulated in zip(jax.tree.leaves(results[1][2]), jax.tree.leaves(results[4][2])):
        np.testing.assert_allclose(accumulated, big, rtol=1e-4, atol=1e-6)


def test_mixed_precision_keeps_float32_master_params():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    config.optim.kwargs.mu_dtype = "bfloat16"
    model = vit.VisionTransformer(plan.vit_config_for(config, 10, 3))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    tx, _ = optim.make_optimizer(config.optim, config.schedule, vit.param_shapes(model), 10)
    shardings = sharding.tree_shardings(train_state.state_shapes(model, tx), mesh, 2**14)
    state = train_state.init_state(model, tx, shardings, jax.random.key(0))
    step = train_step.make_train_step(model, tx, mesh, shardings, accum_steps=2)
    batch = sharding.make_global_batch(next(FakeData(config).train_iter()), mesh)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
    mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda s: hasattr(s, "mu"))
    assert {x.dtype for x in jax.tree.leaves(mu) if x.ndim} >= {jnp.dtype("bfloat16")}


def test_eval_counts_each_example_once_with_padding():
    config = tiny_config()
    data = FakeData(config)
    model = vit.VisionTransformer(plan.vit_config_for(config, 10, 3))
    params = vit.init_params(model, jax.random.key(0))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    eval_step = train_step.make_eval_step(model, mesh, sharding.replicated(mesh))
    results = evaluation.evaluate(eval_step, params, data, mesh)
    assert results["count"] == 37
    # Reference: plain numpy over the 37 real examples.
    images, labels = data._examples(37, (0, 10**6))
    logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
    np.testing.assert_allclose(results["top1"], np.mean(logits.argmax(-1) == labels.argmax(-1)))
    reference_loss = np.mean(np.asarray(train_step.cross_entropy(logits, labels)))
    np.testing.assert_allclose(results["loss"], reference_loss, rtol=1e-5)


# --- Whole runs --------------------------------------------------------------------------------


def test_run_writes_metrics_config_curves_checkpoints_and_final_line(tmp_path, capsys):
    config = tiny_config(log_every_steps=3, eval_every_steps=6, checkpoint_every_steps=6)
    config.keep_checkpoints = 1
    result = trainer.train_and_evaluate(config, str(tmp_path), data=FakeData(config))

    out = capsys.readouterr().out
    assert "step 12/12 | loss" in out and "img/s" in out and "ETA" in out
    assert out.strip().splitlines()[-1] == (
        f"Final test accuracy: {100 * result['eval']['top1']:.2f}% (37 examples)"
    )
    # The line before it: this run's training time, evaluation and checkpoints apart.
    assert re.fullmatch(
        r"Training time: \dm\d\ds for 12 steps \([\d,]+ img/s, compiling included\); "
        r"evaluation and checkpoints \dm\d\ds",
        out.strip().splitlines()[-2],
    ), out
    losses = result["train_losses"]
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in range(10, 13)]) < losses[1] - 0.2  # it learns
    assert result["eval"]["top1"] > 0.5

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["total_steps"] == 12 and saved["model"]["hidden_size"] == 32
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert {"loss", "lr", "grad_norm", "images_per_sec", "images_per_sec_per_device"} <= set(
        train[0]
    )
    assert [r["step"] for r in evals] == [6, 12]  # no second eval at the end
    assert {"loss", "top1", "top5"} <= set(evals[0])
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert checkpoints.TrainCheckpoints(tmp_path / "checkpoints").all_steps() == [12]


def test_preempted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM handlers can only be installed from the main thread")
    config = tiny_config(checkpoint_every_steps=4)
    config.model.dropout_rate = 0.1  # the resumed run must draw the same dropout masks

    uninterrupted = trainer.train_and_evaluate(
        config, str(tmp_path / "uninterrupted"), data=FakeData(config)
    )

    def preempt_at(step):  # the cluster's SIGTERM arrives while batch 6 is being read
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    first = trainer.train_and_evaluate(
        config, str(tmp_path / "resumed"), data=FakeData(config, on_batch=preempt_at)
    )
    assert first["preempted"] and 4 < first["step"] < 12
    saved = checkpoints.TrainCheckpoints(tmp_path / "resumed" / "checkpoints").all_steps()
    assert saved == [4, first["step"]]

    # Resumed with other harmless fields (workdir.HARMLESS): the same numbers, bit for bit.
    other = tiny_config(checkpoint_every_steps=5, log_every_steps=3, keep_checkpoints=1)
    other.steps_per_dispatch = 8
    other.model.dropout_rate = 0.1
    second = trainer.train_and_evaluate(other, str(tmp_path / "resumed"), data=FakeData(other))
    assert not second["preempted"] and min(second["train_losses"]) == first["step"] + 1
    resumed = {**first["train_losses"], **second["train_losses"]}
    assert resumed == uninterrupted["train_losses"]
    assert second["eval"] == uninterrupted["eval"]


def test_a_ctrl_c_in_a_notebook_stops_at_a_step_saves_it_and_gives_ctrl_c_back(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT handlers can only be installed from the main thread")
    config = tiny_config(checkpoint_every_steps=4)
    handler = signal.getsignal(signal.SIGINT)

    def interrupt_at(step):  # the user interrupts the cell while batch 6 is being read
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    result = trainer.train_and_evaluate(
        config, str(tmp_path), data=FakeData(config, on_batch=interrupt_at)
    )
    assert result["stopped_by"] == "SIGINT" and 4 < result["step"] < 12
    saved = checkpoints.TrainCheckpoints(tmp_path / "checkpoints").all_steps()
    assert saved == [4, result["step"]]
    assert signal.getsignal(signal.SIGINT) is handler  # the kernel's next Ctrl-C is its own


def test_nonfinite_loss_names_the_step_and_keeps_the_newest_checkpoint(tmp_path):
    # A NaN image in the batch of step 7; losses are only checked at the step-10 save.
    config = tiny_config(total_steps=12, log_every_steps=100, checkpoint_every_steps=5)
    with pytest.raises(
        loss_watch.NonFiniteLossError, match=r"at step 7\b.*the newest checkpoint is step 5"
    ):
        trainer.train_and_evaluate(config, str(tmp_path), data=FakeData(config, nan_at_step=6))
    assert checkpoints.TrainCheckpoints(tmp_path / "checkpoints").all_steps() == [5]
    _, params = trained.read_model(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_length_from_epochs_and_clear_config_errors():
    config = tiny_config(total_steps=None, total_epochs=2.5)
    assert checks.total_steps_of(config, num_train_examples=100) == 16  # ceil(250 / 16)
    config.total_steps = 10
    with pytest.raises(ValueError, match="exactly one of config.total_steps"):
        checks.total_steps_of(config, 100)
    config = tiny_config()
    config.model.image_size = 32
    with pytest.raises(ValueError, match=r"config.model sets \['image_size'\]"):
        plan.vit_config_for(config, 10, 3)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 16 px, 10-class tiny ViT trained a few steps, saved by the trainer."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config()
    trainer.train_and_evaluate(config, str(workdir), data=FakeData(config))
    return workdir


def test_finetune_from_checkpoint_at_higher_resolution_and_other_class_count(pretrained, tmp_path):
    _, source = trained.read_model(pretrained)
    config = tiny_config(total_steps=3, image_size=32, init_from=str(pretrained))
    config.optim.name, config.optim.kwargs = "sgd", {"momentum": 0.9}
    dst = plan.vit_config_for(config, num_classes=5, num_channels=3)
    params = train_state.load_init_params(config.init_from, dst)
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert posemb.shape == (1, 1 + 8 * 8, 32)  # class row + an 8x8 grid (was 4x4)
    np.testing.assert_array_equal(
        posemb[:, :1], source["Transformer"]["posembed_input"]["pos_embedding"][:, :1]
    )
    assert params["head"]["kernel"].shape == (32, 5) and not np.any(params["head"]["kernel"])
    np.testing.assert_array_equal(params["embedding"]["kernel"], source["embedding"]["kernel"])

    result = trainer.train_and_evaluate(config, str(tmp_path), data=FakeData(config, num_classes=5))
    # A zero head gives uniform predictions: the first loss is exactly ln(5).
    np.testing.assert_allclose(result["train_losses"][1], np.log(5), rtol=1e-5)
    assert result["step"] == 3 and result["eval"]["count"] == 37


PUBLISHED_NPZ = str(FIXTURES / "vit_jax_token_prelogits" / "params.npz")


def test_finetune_init_from_a_published_npz_drops_pre_logits_and_resizes():
    """A published-layout .npz (pre-logits, 10 classes, 16 px) → a 32 px, 5-class linear head."""
    config = tiny_config(image_size=32, init_from=PUBLISHED_NPZ)
    config.model = common.model_fields(
        None, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=(4, 4)
    )
    params = train_state.load_init_params(PUBLISHED_NPZ, plan.vit_config_for(config, 5, 3))
    source = np.load(PUBLISHED_NPZ)
    assert "pre_logits" not in params and params["head"]["kernel"].shape == (32, 5)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 64, 32)
    np.testing.assert_array_equal(params["embedding"]["kernel"], source["embedding/kernel"])

    config.model.num_layers = 3  # a checkpoint of another depth does not fit
    with pytest.raises(ValueError, match="encoderblock_2"):
        train_state.load_init_params(PUBLISHED_NPZ, plan.vit_config_for(config, 5, 3))


def test_missing_or_mismatched_init_checkpoint_is_a_clear_error(pretrained, tmp_path):
    config = tiny_config(init_from=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.init_from=.*missing.*does not exist"):
        trainer.train_and_evaluate(config, str(tmp_path / "a"), data=FakeData(config))
    config = tiny_config(init_from=str(pretrained))
    config.model.mlp_dim = 48  # another architecture
    with pytest.raises(ValueError, match="config.init_from=.*MlpBlock_3/Dense_0/kernel"):
        trainer.train_and_evaluate(config, str(tmp_path / "b"), data=FakeData(config))
    assert not (tmp_path / "b" / "checkpoints").exists() or not list(
        (tmp_path / "b" / "checkpoints").iterdir()
    )


# --- The real pipeline: digits, and 1 vs 8 devices ----------------------------------------------


def digits_config(data_dir, **overrides):
    config = tiny_config(dataset="digits", data_dir=data_dir, **overrides)
    config.pp.crop_area_range = None  # 8x8 digits: whole image, no flips
    config.pp.flip = False
    # Unshifted images and hard labels: 60 steps of the tiny model are too few to learn through
    # the recipe's shifts (the loss falls by 12 % with them, by 27 % without).
    config.pp.translate_pixels = 0
    config.pp.label_smoothing = 0.0
    config.shuffle_buffer_size = 2000
    return config


def test_loss_falls_on_digits(digits_data_dir, tmp_path):
    config = digits_config(digits_data_dir, total_steps=60, batch_size=64, log_every_steps=10)
    config.eval_batch_size = 128
    result = trainer.train_and_evaluate(config, str(tmp_path))
    losses = result["train_losses"]
    assert np.mean([losses[s] for s in range(51, 61)]) < 0.8 * np.mean(
        [losses[s] for s in range(1, 11)]
    )
    assert result["eval"]["count"] == 360 and result["eval"]["top1"] > 0.3


MOCK_EXAMPLES = 64


def write_mock_cifar10(data_dir: str) -> None:
    """Split sizes for `tfds.testing.mock_data` (it mocks the records, not the dataset info)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=data_dir)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name="cifar10", filetype_suffix="tfrecord"
    )
    splits = [
        tfds.core.SplitInfo(
            name=name, shard_lengths=[MOCK_EXAMPLES], num_bytes=0, filename_template=template
        )
        for name in ("train", "test")
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


def run_on_mock_cifar10(data_dir: str, workdir: str, mesh: dict) -> list[float]:
    """4 steps on mock cifar10 (SGD with momentum, dropout on): the 4 losses and the eval loss.

    SGD, because its update is linear in the gradient: Adam's first steps take sign(gradient), so
    entries that are zero up to rounding (there are some: the head starts at zero) would flip
    between device counts and hide real differences behind that noise.
    """
    import tensorflow_datasets as tfds

    config = tiny_config(dataset="cifar10", data_dir=data_dir, total_steps=4, batch_size=32)
    config.eval_batch_size = 24  # 64 test examples: 3 batches, the last one padded
    config.shuffle_buffer_size = MOCK_EXAMPLES
    config.model.dropout_rate = 0.1  # dropout masks must not depend on the device count either
    config.optim.name, config.optim.kwargs = "sgd", {"momentum": 0.9}
    config.optim.learning_rate = 0.1
    config.schedule.warmup_steps = 0
    config.mesh.data, config.mesh.fsdp = mesh["data"], mesh["fsdp"]
    config.fsdp_min_size = 0  # shard every divisible parameter over 'fsdp'
    # mock_data swaps in a fake file system (process-wide) while a dataset is opened; an async
    # checkpoint being written in the background at that moment would land in it.
    config.async_checkpoints = False
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(MOCK_EXAMPLES, policy=policy, data_dir=data_dir):
        result = trainer.train_and_evaluate(config, workdir)
    assert result["eval"]["count"] == MOCK_EXAMPLES
    return [result["train_losses"][s] for s in range(1, 5)] + [result["eval"]["loss"]]


EIGHT_DEVICE_RUN = """
import json, sys
sys.path[:0] = [{repo!r}, {repo!r} + '/tests']  # the repo and tests/helpers.py
import jax
from tests.test_trainer import run_on_mock_cifar10
assert jax.device_count() == 8
losses = run_on_mock_cifar10({data_dir!r}, {workdir!r}, dict(data=2, fsdp=4))
print(json.dumps(losses))
"""


@pytest.mark.slow  # a second JAX process with 8 devices: ~10 s warm, ~35 s with a cold cache
def test_one_and_eight_devices_give_the_same_losses(tmp_path):
    data_dir = str(tmp_path / "tfds")
    write_mock_cifar10(data_dir)
    one = run_on_mock_cifar10(data_dir, str(tmp_path / "one"), dict(data=1, fsdp=1))

    code = EIGHT_DEVICE_RUN.format(
        repo=str(REPO), data_dir=data_dir, workdir=str(tmp_path / "eight")
    )
    out = run_with_devices(code, devices=8, timeout=400)
    eight = json.loads(out.strip().splitlines()[-1])
    # Same global batch, same math: only the order of floating-point sums differs. (The 8 devices
    # form a 2 x 4 mesh: data parallel over 'data', parameters sharded over 'fsdp'.)
    assert one[0] != one[3]  # the model did change over the 4 steps
    np.testing.assert_allclose(eight, one, rtol=2e-5)


def test_cross_entropy_takes_soft_targets():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    smoothed = jnp.array([[0.9, 0.05, 0.05]])
    expected = -np.sum(np.asarray(smoothed) * np.log(np.asarray(jax.nn.softmax(logits))))
    np.testing.assert_allclose(train_step.cross_entropy(logits, smoothed), [expected], rtol=1e-6)
