"""A train split above the in-memory bound goes through train.py exactly, read by Grain workers.

The split is generated (`fractaldb/c10_i40_r16`, 400 train fractals stored as ArrayRecord) and
`in_memory_max_bytes=0` (a config field lowers the bound, so CI's split is small) sends it through
the by-index path, read with `reader='grain'` (2 worker processes per train.py process): one chain
of real runs on 4 devices in all, 2 processes x 2 devices stopped by SIGTERM, resumed as 1
process x 4 devices and killed mid-epoch (SIGKILL: no clean-up, the newest checkpoint is what is
left), resumed as 2 x 2 again to the end, each leg with other harmless fields, against an
uninterrupted 1 x 4 run. With 4 devices the cross-device sums add in another order on each
topology, so the bound is test_multiprocess.py's (rtol 1e-5) rather than bit for bit
(test_exact_resume.py says why 2 devices are exact). The legs' helpers are test_exact_resume.py's.

At full size, the same chain on a split well above the default bound (256 MiB), at 224 px:

  LARGE_SPLIT_DATASET=fractaldb/c10_i2500_r224 LARGE_SPLIT_BOUND=default \
      .venv/bin/python -m pytest -q tests/test_large_split.py

(the model reads the 224 px images resized to its 16 px; README "Large splits" gives the result).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from test_exact_resume import check_legs, run_chain
from test_multiprocess import train_losses

from vit_jax import trained
from vit_jax.model import transfer
from vit_jax.train import workdir

pytestmark = pytest.mark.slow  # seven train.py processes

STEPS = 60
DATASET = os.environ.get("LARGE_SPLIT_DATASET", "fractaldb/c10_i40_r16")
BOUND = os.environ.get("LARGE_SPLIT_BOUND", "0")  # 'default': the default in_memory_max_bytes
BASE = [
    f"--config.total_steps={STEPS}",
    f"--config.dataset={DATASET}",
    "--config.data_on_device=False",
    *([] if BOUND == "default" else [f"--config.in_memory_max_bytes={BOUND}"]),
    "--config.reader=grain",
    "--config.grain_workers=2",
]
REFERENCE = {"steps_per_dispatch": 8, "log_every_steps": 1, "checkpoint_every_steps": 0}
LEGS = [
    (2, 2, {"steps_per_dispatch": 1, "log_every_steps": 1, "checkpoint_every_steps": 0}, "SIGTERM"),
    (1, 4, {"log_every_steps": 1, "checkpoint_every_steps": 4, "keep_checkpoints": 2}, "SIGKILL"),
    (2, 2, {"log_every_steps": 5, "checkpoint_every_steps": 0, "steps_per_dispatch": 4}, None),
]


@pytest.fixture(scope="module")
def generated_data_dir(tmp_path_factory) -> str:
    """DATASET generated (ArrayRecord, the builder's default) into a data dir of its own."""
    import tensorflow_datasets as tfds

    import vit_jax.data.builders  # noqa: F401  (registers `fractaldb`)

    data_dir = str(tmp_path_factory.mktemp("generated"))
    tfds.builder(DATASET, data_dir=data_dir, workers=2).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory, generated_data_dir):
    tmp = tmp_path_factory.mktemp("large_split")
    return run_chain(tmp, LEGS, REFERENCE, generated_data_dir, base=BASE, topology=(1, 4))


def test_the_split_is_read_by_index_in_grain_workers(chain):
    _, out, err = chain["reference"]
    assert "read by index in 2 Grain worker process(es) per process" in out, err[-2000:]
    split_bytes = int(re.search(r"Train split train \(([\d,]+) bytes\)", out)[1].replace(",", ""))
    bound = 256 * 2**20 if BOUND == "default" else int(BOUND)
    assert split_bytes > bound
    print(f"{DATASET} train split: {split_bytes:,} bytes (in-memory bound {bound:,})")


def test_each_leg_stops_as_asked_and_resumes_where_the_last_one_saved(chain):
    check_legs(LEGS, chain, STEPS)
    _, out, _, moment = chain["legs"][1]
    assert "Resuming a 2-process checkpoint on 1 process(es): the data order is global" in out
    _, out, _, moment = chain["legs"][2]
    assert moment["resumed_from"] and moment["resumed_from"] % 4 == 0, moment  # SIGKILL: a save


def test_every_step_and_the_end_match_the_uninterrupted_run(chain):
    assert chain["reference"][0] == [0], chain["reference"][2][-2000:]
    losses, reference = train_losses(chain["work"]), train_losses(chain["tmp"] / "reference")
    # Every step up to the last leg's start was logged (the killed leg's steps after its last
    # checkpoint too: they ran, and ran again), then every 5th: the mean loss since the last line.
    start = chain["legs"][2][3]["resumed_from"]
    assert set(range(1, start + 1)) | set(range(5, STEPS + 1, 5)) <= set(losses)
    assert set(losses) <= set(reference) == set(range(1, STEPS + 1))
    for step, loss in sorted(losses.items()):
        since = max(start, step - 5) if step > start and step % 5 == 0 else step - 1
        expected = np.mean([reference[s] for s in range(since + 1, step + 1)])
        np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=f"step {step}")
    params = transfer.flatten(trained.read_model(str(chain["work"]))[1])
    expected = transfer.flatten(trained.read_model(str(chain["tmp"] / "reference"))[1])
    assert sorted(params) == sorted(expected)
    for name, value in params.items():
        if name.endswith("key/bias"):  # only rounding noise as gradient, which Adam turns into
            # lr-sized random steps (assert_same_params says why): near 0 in both, not equal
            assert np.abs(value).max() < 1e-4 and np.abs(expected[name]).max() < 1e-4, name
        else:
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_every_leg_changes_only_harmless_fields():
    for _, _, fields, _ in LEGS:
        assert set(fields) <= set(workdir.HARMLESS), set(fields) - set(workdir.HARMLESS)
