"""Several train steps per dispatch give the results of single steps; events keep their steps."""

import numpy as np
import pytest
from test_trainer import FakeData, tiny_config

from vit_jax.train import dispatch, trainer


def test_plan_groups_steps_between_boundaries_and_reaches_each_boundary_exactly():
    sizes = dispatch.plan(0, 23, 4, every=(10, 0))
    ends = np.cumsum(sizes)
    assert ends[-1] == 23 and set(sizes) == {1, 4}
    assert 10 in ends and 20 in ends  # log/eval/checkpoint steps are dispatch ends
    assert sizes[:2] == [4, 4] and sizes[2:4] == [1, 1]  # 8 → 10 in single steps
    assert dispatch.plan(5, 9, 1, every=(3,)) == [1, 1, 1, 1]
    assert dispatch.plan(3, 11, 4, every=()) == [
        4,
        4,
    ]  # resumed mid-run: groups from the start step
    with pytest.raises(ValueError, match="steps_per_dispatch=0"):
        dispatch.plan(0, 10, 0, every=())


def test_grouped_stacks_consecutive_batches_in_order():
    batches = iter({"x": np.full((2,), i)} for i in range(5))
    groups = list(dispatch.grouped(batches, [3, 1, 1]))
    assert [size for size, _ in groups] == [3, 1, 1]
    np.testing.assert_array_equal(groups[0][1]["x"], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(groups[2][1]["x"], [4, 4])


def test_k_steps_per_dispatch_equal_single_steps(tmp_path):
    # Dropout on: every step must also draw the rng of its own step number inside the scan.
    results = {}
    for k in (1, 4):
        config = tiny_config(total_steps=11, log_every_steps=5, eval_every_steps=10)
        config.steps_per_dispatch = k
        config.model.dropout_rate = 0.1
        results[k] = trainer.train_and_evaluate(
            config, str(tmp_path / f"k{k}"), data=FakeData(config)
        )
    single, multi = results[1], results[4]
    assert multi["step"] == single["step"] == 11
    assert sorted(multi["train_losses"]) == list(range(1, 12))
    for step, loss in single["train_losses"].items():
        np.testing.assert_allclose(multi["train_losses"][step], loss, rtol=1e-5, err_msg=f"{step}")
    assert multi["eval"] == pytest.approx(single["eval"], rel=1e-5)
