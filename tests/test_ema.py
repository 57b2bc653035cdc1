"""Weight EMA (`config.ema_decay`): the definition step by step, exact resume, the eval records,
bad values, resume refusals, and reading the EMA or raw weights back (`load_pretrained(weights=)`,
`predict --weights`, `convert --weights`).

The EMA of step s+1 is e_{s+1} = d_s e_s + (1 - d_s) p_{s+1} with d_s = min(decay, (1+s)/(10+s))
and e_0 = p_0 (vit_jax/train/step.py). Every run here is the tiny recipe: in-process on host
batches (test_trainer.FakeData) where the trainer alone is under test, real `train.py` processes
(one reference run shared by the module) where the command line is.
"""

import json
import shutil
import signal
import threading

import jax
import numpy as np
import pytest
from helpers import TINY_CONFIG, assert_params_identical, sigterm_at, train_py
from test_bad_input import run_cli  # noqa: F401  (the fixture: a CLI's main in-process)
from test_stop_signals import signal_after_step
from test_trainer import FakeData, tiny_config

from vit_jax import checkpoints, sharding, trained
from vit_jax.interop import load
from vit_jax.model import transfer, vit
from vit_jax.train import checks, dispatch, optim, plan, trainer, workdir
from vit_jax.train import state as train_state
from vit_jax.train import step as train_step

DECAY = 0.5  # the warm-up (1+s)/(10+s) reaches 0.5 at s = 8: 12 steps see both regimes
STEPS = 12


def _reference_decay(s: int, decay: float) -> np.float32:
    return np.minimum(np.float32(decay), np.float32(1 + s) / np.float32(10 + s))


@pytest.fixture(scope="module")
def stepped():
    """The trainer's compiled step program with EMA, run one step per dispatch for STEPS steps:
    [(params, ema_params) as numpy] after step 0 (init), 1, ..., STEPS."""
    config = tiny_config()
    model = vit.VisionTransformer(plan.vit_config_for(config, num_classes=10, num_channels=3))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    tx, _ = optim.make_optimizer(config.optim, config.schedule, vit.param_shapes(model), STEPS)
    shardings = sharding.tree_shardings(train_state.state_shapes(model, tx, ema=True), mesh, 2**14)
    state = train_state.init_state(model, tx, shardings, jax.random.key(0))
    steps_fn = train_step.make_multi_step(model, tx, mesh, shardings, ema_decay=DECAY)
    batches = dispatch.to_devices(
        dispatch.grouped(FakeData(config).train_iter(), [1] * STEPS, 1), mesh
    )
    host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
    history = [(host(state["params"]), host(state["ema_params"]))]
    for size, batch in batches:
        state, _ = steps_fn(state, batch, size)
        history.append((host(state["params"]), host(state["ema_params"])))
    return history


def test_ema_equals_its_definition_step_by_step(stepped):
    params0, ema0 = stepped[0]
    assert_params_identical(ema0, params0)  # e_0 = p_0, a copy
    expected = transfer.flatten(ema0)
    for s in range(STEPS):
        d = _reference_decay(s, DECAY)
        params = transfer.flatten(stepped[s + 1][0])
        expected = {k: d * e + (np.float32(1) - d) * params[k] for k, e in expected.items()}
        ema = transfer.flatten(stepped[s + 1][1])
        for key, value in ema.items():
            assert value.dtype == np.float32, key
            # f32 both ways; XLA may fuse d*e + (1-d)*p into an FMA: a few ulps at most
            np.testing.assert_allclose(value, expected[key], rtol=2e-6, atol=1e-8, err_msg=key)
    # It is an average, not a copy: the params moved away from it.
    final_params, final_ema = (transfer.flatten(t) for t in stepped[-1])
    assert max(np.abs(final_params[k] - final_ema[k]).max() for k in final_ema) > 1e-4


def test_the_decay_warms_up_as_documented():
    got = [float(train_step.ema_decay_at(s, 0.9999)) for s in (0, 1, 90, 10**6)]
    assert got == pytest.approx([0.1, 2 / 11, 91 / 100, 0.9999], rel=1e-6)
    assert float(train_step.ema_decay_at(100, 0.5)) == 0.5


def test_keeping_an_ema_changes_no_bit_of_the_raw_training(tmp_path):
    """The EMA only reads the new params: with it on, the losses and the raw weights are those of
    the same run without it (dropout on, so the step's random draws are covered too)."""
    runs = {}
    for decay in (0.0, 0.9):
        config = tiny_config(ema_decay=decay)
        config.model.dropout_rate = 0.1
        work = str(tmp_path / f"ema_{decay}")
        result = trainer.train_and_evaluate(config, work, data=FakeData(config))
        runs[decay] = result, trained.read_model(work, weights="raw")[1]
    assert runs[0.9][0]["train_losses"] == runs[0.0][0]["train_losses"]
    assert_params_identical(runs[0.9][1], runs[0.0][1])
    assert runs[0.9][0]["eval"] == runs[0.0][0]["eval"] and runs[0.0][0]["eval_ema"] is None


def test_a_preempted_run_resumes_with_bit_identical_ema_params(tmp_path):
    """SIGTERM mid-run in-process (host batches), then resumed with other harmless fields: the
    EMA and raw weights equal the uninterrupted run's bit for bit, and so do both evaluations."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM handlers can only be installed from the main thread")
    config = tiny_config(checkpoint_every_steps=4, ema_decay=0.9)
    ref = trainer.train_and_evaluate(config, str(tmp_path / "ref"), data=FakeData(config))

    work = str(tmp_path / "resumed")
    first = trainer.train_and_evaluate(config, work, data=FakeData(config, on_batch=sigterm_at(6)))
    assert first["preempted"] and 4 < first["step"] < 12
    other = tiny_config(checkpoint_every_steps=5, log_every_steps=3, ema_decay=0.9)
    other.steps_per_dispatch = 8
    second = trainer.train_and_evaluate(other, work, data=FakeData(other))
    assert not second["preempted"] and second["step"] == 12
    for weights in ("ema", "raw"):
        assert_params_identical(
            trained.read_model(work, weights=weights)[1],
            trained.read_model(str(tmp_path / "ref"), weights=weights)[1],
        )
    assert second["eval"] == ref["eval"] and second["eval_ema"] == ref["eval_ema"]


# --- Real train.py runs ------------------------------------------------------------------------

RUN_STEPS = 40
RUN_FIELDS = [
    f"--config.total_steps={RUN_STEPS}",
    "--config.eval_every_steps=20",
    "--config.checkpoint_every_steps=0",
    "--config.ema_decay=0.9",
]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, digits_data_dir):
    """One uninterrupted train.py run of the tiny recipe with EMA: (workdir, stdout)."""
    work = tmp_path_factory.mktemp("ema_run") / "w"
    cmd = train_py(TINY_CONFIG, work, digits_data_dir, *RUN_FIELDS)
    status, out, err = signal_after_step(cmd, [], step=RUN_STEPS)
    assert status == 0, err[-3000:]
    return work, out


def test_a_run_logs_both_evaluations_and_the_final_line_names_the_ema(ema_run):
    work, out = ema_run
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["split"] == "eval"}
    emas = {r["step"]: r for r in records if r["split"] == "eval_ema"}
    assert sorted(evals) == sorted(emas) == [20, 40]
    assert emas[40]["count"] == 360 and 0.0 <= emas[40]["top1"] <= 1.0
    assert emas[40] != evals[40]  # other weights, other numbers
    lines = out.strip().splitlines()
    eval_line = next(x for x in lines if x.startswith("eval at step 40:"))
    assert f"; EMA weights: loss {emas[40]['loss']:.4f} | top1 {100 * emas[40]['top1']:.2f}%" in (
        eval_line
    )
    assert lines[-1] == (
        f"Final test accuracy: {100 * evals[40]['top1']:.2f}% (360 examples); "
        f"EMA weights: {100 * emas[40]['top1']:.2f}%"
    )
    # Both weight sets are in the checkpoint, fingerprinted like the params.
    record = json.loads(next((work / "checkpoints" / "40" / "integrity").glob("*")).read_text())
    assert any(k.startswith("['ema_params']") for k in record["arrays"])


@pytest.mark.slow  # two more train.py processes
def test_a_sigterm_stopped_train_py_run_resumes_with_bit_identical_ema(
    ema_run, digits_data_dir, tmp_path
):
    ref, ref_out = ema_run
    work = tmp_path / "w"
    cmd = train_py(TINY_CONFIG, work, digits_data_dir, *RUN_FIELDS)
    status, out, err = signal_after_step(cmd, [signal.SIGTERM], step=13)
    assert status == 143, err[-3000:]
    stopped_at = workdir.latest_checkpoint_step(str(work))
    assert 13 <= stopped_at < RUN_STEPS
    status, out, err = signal_after_step(cmd + ["--config.log_every_steps=7"], [], step=RUN_STEPS)
    assert status == 0, err[-3000:]
    assert f"Resuming from the checkpoint of step {stopped_at}" in out
    assert out.strip().splitlines()[-1] == ref_out.strip().splitlines()[-1]
    for weights in ("ema", "raw"):
        assert_params_identical(
            trained.read_model(str(work), weights=weights)[1],
            trained.read_model(str(ref), weights=weights)[1],
        )


# --- Bad values and resume refusals ------------------------------------------------------------


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, float("nan"), True])
def test_bad_decays_are_one_clear_error(value):
    config = tiny_config()
    config.ema_decay = value
    with pytest.raises(ValueError, match=r"config.ema_decay=.* is invalid: must be in \[0, 1\)"):
        checks.validate_training(config)


@pytest.mark.parametrize(
    "value, status, named",
    [("1", 1, "ema_decay=1.0"), ("1.5", 1, "ema_decay=1.5"), ("-0.1", 1, "ema_decay=-0.1")]
    + [("x", 2, "'x'")],
)
def test_bad_decays_on_the_command_line_fail_before_any_compute(
    value,
    status,
    named,
    run_cli,  # noqa: F811  (the fixture imported above)
    tiny_config_path,
    digits_data_dir,
    tmp_path,
):
    fresh = tmp_path / "fresh"
    code, out, err = run_cli(
        "train",
        [
            f"--config={tiny_config_path}",
            f"--workdir={fresh}",
            f"--config.data_dir={digits_data_dir}",
            f"--config.ema_decay={value}",
        ],
    )
    fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
    assert code == status and len(fatal) == 1 and err.strip() == fatal[0], err
    assert named in fatal[0] and "ema_decay" in fatal[0]
    assert not fresh.exists()  # refused before the workdir was even created


def test_ema_decay_is_an_identity_field_not_a_harmless_one():
    assert not any(workdir._listed("ema_decay", f) for f in (workdir.HARMLESS, workdir.ROUNDING))
    old = {"seed": 0, "ema_decay": 0.9}
    assert workdir.config_differences(old, {**old, "ema_decay": 0.99}) == ["ema_decay 0.9 → 0.99"]
    assert workdir.config_differences(old, {**old, "ema_decay": 0.0}) == ["ema_decay 0.9 → 0.0"]
    # A workdir written before the field existed ran without EMA: it resumes with 0, not with EMA.
    assert workdir.config_differences({"seed": 0}, {"seed": 0, "ema_decay": 0.0}) == []
    assert workdir.config_differences({"seed": 0}, {"seed": 0, "ema_decay": 0.9}) == [
        "ema_decay 0.0 → 0.9"
    ]


def test_turning_ema_on_at_resume_is_refused_and_changes_nothing(
    tiny_workdir, digits_data_dir, tmp_path
):
    """The shared tiny run (no EMA) resumed with ema_decay: refused by the config check naming the
    field; with its config.json gone, by the checkpoint check, its steps not moved aside."""
    from helpers import tiny_recipe

    work = tmp_path / "w"
    shutil.copytree(tiny_workdir, work)
    config = tiny_recipe()
    config.data_dir, config.ema_decay = digits_data_dir, 0.9
    with pytest.raises(workdir.WorkdirConflictError, match="ema_decay 0.0 → 0.9"):
        trainer.train_and_evaluate(config, str(work))
    (work / "config.json").unlink()
    with pytest.raises(ValueError, match=r"ema_decay=0.9 does not fit .* has no EMA weights"):
        trainer.train_and_evaluate(config, str(work))
    assert checkpoints.TrainCheckpoints(work / "checkpoints").all_steps() == [2, 3]
    assert not (work / checkpoints.DAMAGED_DIR).exists()


# --- Reading the EMA or the raw weights back ---------------------------------------------------


def test_load_pretrained_reads_the_ema_by_default_and_raw_on_request(ema_run):
    work, _ = ema_run
    raw = trained.read_model(str(work), weights="raw")[1]
    ema = trained.read_model(str(work), weights="ema")[1]
    flat_raw, flat_ema = transfer.flatten(raw), transfer.flatten(ema)
    assert any(not np.array_equal(flat_raw[k], flat_ema[k]) for k in flat_raw)  # two sets
    for weights, expected in ((None, ema), ("ema", ema), ("raw", raw)):
        model, params = load.load_pretrained(str(work), weights=weights)
        assert_params_identical(params, expected)
        assert model.config.num_classes == 10
    assert load.load_checkpoint(str(work)).weights == "ema"
    assert load.load_checkpoint(str(work / "checkpoints" / "40"), weights="raw").weights == "raw"
    with pytest.raises(ValueError, match=r"weights='best' is invalid; allowed: 'ema'"):
        load.load_pretrained(str(work), weights="best")


def test_a_checkpoint_without_ema_reads_raw_and_refuses_ema_naming_it(tiny_workdir, tmp_path):
    assert load.load_checkpoint(tiny_workdir).weights == "raw"
    assert_params_identical(
        load.load_pretrained(tiny_workdir)[1], trained.read_model(tiny_workdir)[1]
    )
    with pytest.raises(trained.NoEmaWeightsError, match=r"checkpoints/3 has no EMA weights"):
        load.load_pretrained(tiny_workdir, weights="ema")
    # Any other format holds one set of weights: 'ema' is refused naming it, 'raw' reads it.
    from vit_jax.interop import save

    model, params = load.load_pretrained(tiny_workdir)
    npz = str(tmp_path / "m.npz")
    save.save_pretrained(params, npz, format="npz", model=model.config)
    with pytest.raises(ValueError, match=r"weights='ema': .*m.npz is not a vit_jax training"):
        load.load_pretrained(npz, weights="ema")
    assert load.load_checkpoint(npz, weights="raw").weights is None


def _image(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels, "L").save(path)
    return str(path)


def test_predict_answers_with_the_chosen_weights(ema_run, tmp_path, run_cli):  # noqa: F811
    work, _ = ema_run
    image = _image(tmp_path)
    outputs = {}
    for flag in ([], ["--weights", "ema"], ["--weights", "raw"]):
        code, out, err = run_cli("predict", ["--checkpoint", str(work), *flag, image])
        assert code == 0, err
        outputs[tuple(flag)] = out
        which = "the raw (not averaged) weights" if "raw" in flag else "the EMA weights"
        assert f"{work}: {which}" in err
    assert outputs[()] == outputs[("--weights", "ema")]
    assert outputs[()] != outputs[("--weights", "raw")]
    code, _, err = run_cli("predict", ["--checkpoint", str(work), "--weights", "best", image])
    assert code == 2 and "best" in err


def test_convert_writes_the_chosen_weights(ema_run, tmp_path, run_cli):  # noqa: F811
    work, _ = ema_run
    for flag, weights in (([], "ema"), (["--weights", "raw"], "raw")):
        dst = str(tmp_path / f"{weights}.npz")
        code, out, err = run_cli("convert", [str(work), dst, "--to", "npz", *flag])
        assert code == 0, err
        assert f"from the {'EMA' if weights == 'ema' else 'raw'} weights" in out
        expected = trained.read_model(str(work), weights=weights)[1]
        got = load.load_pretrained(dst)[1]
        for key, value in transfer.flatten(expected).items():
            np.testing.assert_array_equal(transfer.flatten(got)[key], value, err_msg=key)


def test_convert_refuses_ema_from_a_checkpoint_without_it(tiny_workdir, tmp_path, run_cli):  # noqa: F811
    dst = tmp_path / "x.npz"
    code, _, err = run_cli("convert", [tiny_workdir, str(dst), "--to", "npz", "--weights", "ema"])
    fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
    assert code == 1 and len(fatal) == 1 and "has no EMA weights" in fatal[0], err
    assert not dst.exists()


def test_the_fewshot_command_line_says_which_weights_it_read(ema_run, digits_data_dir, capsys):
    from vit_jax.tools import fewshot as fewshot_cli

    work, _ = ema_run
    argv = [
        "--checkpoint",
        str(work),
        "--data_dir",
        digits_data_dir,
        "--shots",
        "1",
        "--seeds",
        "0",
    ]
    for flag, shown in (([], "ema"), (["--weights", "raw"], "raw")):
        assert fewshot_cli.main([*argv, *flag]) == 0
        assert f"{work} ({shown} weights): " in capsys.readouterr().out


def test_the_ema_params_are_sharded_exactly_as_the_params():
    """Under FSDP (and sharding rules) each EMA array takes its parameter's spec: computed for a
    4-way 'fsdp' mesh from the shapes alone, no devices needed."""
    config = tiny_config()
    model = vit.VisionTransformer(plan.vit_config_for(config, num_classes=10, num_channels=3))
    tx, _ = optim.make_optimizer(config.optim, config.schedule, vit.param_shapes(model), 12)
    shapes = train_state.state_shapes(model, tx, ema=True)
    rules = [("pos_embedding", "replicate")]
    specs = sharding.tree_specs(shapes, {"data": 1, "fsdp": 4}, 64, rules)
    spec = jax.sharding.PartitionSpec

    def leaves(tree):
        return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, spec))

    assert leaves(specs["ema_params"]) == leaves(specs["params"])
    assert len(leaves(specs["ema_params"])) == len(jax.tree.leaves(shapes["params"]))
    assert any(s != spec() for s in leaves(specs["ema_params"]))  # FSDP cut some of them
    assert specs["ema_params"]["Transformer"]["posembed_input"]["pos_embedding"] == spec()
