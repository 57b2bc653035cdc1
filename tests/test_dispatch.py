"""Which steps run together, and their stacked batches; events keep their steps. (That any grouping
trains exactly the same numbers is tests/test_harmless_fields.py's.)"""

import numpy as np
import pytest

from vit_jax.train import dispatch


def test_plan_groups_steps_between_boundaries_and_reaches_each_boundary_exactly():
    sizes = dispatch.plan(0, 23, 4, every=(10, 0))
    assert sizes == [4, 4, 2, 4, 4, 2, 3]  # a group ends early at a boundary, never crosses it
    assert 10 in np.cumsum(sizes) and 20 in np.cumsum(sizes)  # log/eval/checkpoint steps
    assert dispatch.plan(0, 10, 8, every=(5, 7)) == [5, 2, 3]
    assert dispatch.plan(5, 9, 1, every=(3,)) == [1, 1, 1, 1]
    assert dispatch.plan(3, 11, 4, every=()) == [4, 4]  # resumed mid-run: groups from the start
    with pytest.raises(ValueError, match="steps_per_dispatch=0"):
        dispatch.plan(0, 10, 0, every=())


def test_grouped_stacks_consecutive_batches_in_order_padded_to_the_programs_k():
    batches = iter({"x": np.full((2,), i)} for i in range(5))
    groups = list(dispatch.grouped(batches, [3, 1, 1], stack=3))
    assert [size for size, _ in groups] == [3, 1, 1]
    np.testing.assert_array_equal(groups[0][1]["x"], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(groups[2][1]["x"], [[4, 4], [0, 0], [0, 0]])
    (size, single), *_ = dispatch.grouped(iter([{"x": np.ones(2)}]), [1], stack=1)
    assert size == 1 and single["x"].shape == (1, 2)
