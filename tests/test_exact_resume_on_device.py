"""Every stop resumes exactly on the on-device digits path, across process counts.

The digits recipe's own path (`data_on_device=True`: the split lives on the devices, each step's
batch is drawn and augmented there from (seed, step)). One chain of real `train.py` runs: 2
processes x 1 device stopped by SIGTERM to one of them, resumed as 1 process x 2 devices with
other harmless fields and stopped by SIGINT, then resumed on 2 processes again to the end. It must
end with the uninterrupted 1 x 2 run's final params, bit for bit, and its final line (2 devices
in all on both topologies: test_exact_resume.py says why that is exact). The legs' helpers are
test_exact_resume.py's; SIGKILL and a crash on this path are in tests/test_stop_signals.py.
"""

from __future__ import annotations

import pytest
from test_exact_resume import STEPS, check_ends_like_the_reference, check_legs, run_chain

from vit_jax.train import workdir

pytestmark = pytest.mark.slow  # five train.py processes

BASE = [f"--config.total_steps={STEPS}", "--config.data_on_device=True"]
REFERENCE = {"steps_per_dispatch": 8, "log_every_steps": 50, "checkpoint_every_steps": 0}
LEGS = [
    (2, 1, {"steps_per_dispatch": 1, "log_every_steps": 1, "checkpoint_every_steps": 0}, "SIGTERM"),
    (
        1,
        2,
        {"log_every_steps": 1, "checkpoint_every_steps": 10, "keep_checkpoints": 1},
        "SIGINT",
    ),
    (2, 1, {"log_every_steps": 3, "checkpoint_every_steps": 7, "steps_per_dispatch": 4}, None),
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits_data_dir):
    tmp = tmp_path_factory.mktemp("exact_resume_on_device")
    return run_chain(tmp, LEGS, REFERENCE, digits_data_dir, base=BASE)


def test_each_leg_stops_as_asked_and_resumes_where_the_last_one_saved(chain):
    check_legs(LEGS, chain)


def test_the_process_count_changes_between_legs_with_the_global_order(chain):
    for n, message in [
        (1, "Resuming a 2-process checkpoint on 1 process(es)"),
        (2, "Resuming a 1-process checkpoint on 2 process(es)"),
    ]:
        _, out, _, moment = chain["legs"][n]
        assert moment["resumed_from"], moment
        assert message in out, out[-2000:]


def test_the_stopped_chain_ends_exactly_where_the_uninterrupted_run_ends(chain):
    check_ends_like_the_reference(chain)


def test_every_leg_changes_only_harmless_fields():
    for _, _, fields, _ in LEGS:
        assert set(fields) <= set(workdir.HARMLESS), set(fields) - set(workdir.HARMLESS)
