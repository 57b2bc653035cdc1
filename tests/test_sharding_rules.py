"""vit_jax.sharding: config rules → PartitionSpecs for params and optimizer state, and the report.

Specs are computed from shapes and the mesh's axis sizes alone, so no devices are needed here.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import REPO, run_with_devices
from jax.sharding import PartitionSpec as P

from vit_jax import sharding

MESH = {"data": 2, "fsdp": 4}
KERNEL = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"


def state_shapes():
    params = {
        "Transformer": {
            "encoderblock_0": {
                "MlpBlock_3": {
                    "Dense_0": {
                        "kernel": jnp.zeros((64, 256)),  # 16,384 elements
                        "bias": jnp.zeros((256,)),
                    }
                }
            }
        },
        "pos_embedding": jnp.zeros((1, 64, 64)),  # 4,096
        "head": {"kernel": jnp.zeros((64, 10))},  # 640; 10 does not divide by 4
    }
    tx = optax.adamw(1e-3)
    return jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params), "step": 0})


def mlp(tree):
    return tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]


def test_default_fsdp_rule_cuts_the_largest_divisible_dim_above_the_threshold():
    specs = sharding.tree_specs(state_shapes(), MESH, min_size=4096)
    assert mlp(specs["params"])["kernel"] == P(None, "fsdp")
    assert mlp(specs["params"])["bias"] == P()  # 256 < 4096
    assert specs["params"]["pos_embedding"] == P(None, "fsdp", None)  # first of the largest
    assert specs["params"]["head"]["kernel"] == P()  # 640 < 4096
    mu = specs["opt_state"][0].mu  # Adam's moments take their parameter's spec
    assert mlp(mu)["kernel"] == P(None, "fsdp") and mu["pos_embedding"] == P(None, "fsdp", None)
    assert specs["opt_state"][0].count == P()


def test_rules_first_match_wins_and_optimizer_state_follows():
    rules = (
        ("pos_embedding", "replicate"),
        ("Dense_0/kernel$", ("fsdp", None)),
        ("kernel$", "replicate"),  # never reached for the MLP kernel: the rule above wins
    )
    specs = sharding.tree_specs(state_shapes(), MESH, min_size=0, rules=rules)
    assert mlp(specs["params"])["kernel"] == P("fsdp", None)
    assert specs["params"]["pos_embedding"] == P()
    assert specs["params"]["head"]["kernel"] == P()
    assert mlp(specs["params"])["bias"] == P("fsdp")  # no rule: the fsdp default (min_size 0)
    for moment in (specs["opt_state"][0].mu, specs["opt_state"][0].nu):
        assert mlp(moment)["kernel"] == P("fsdp", None) and moment["pos_embedding"] == P()


def test_describe_counts_what_is_sharded():
    shapes = state_shapes()
    specs = sharding.tree_specs(shapes, MESH, min_size=4096)
    line, any_sharded = sharding.describe(shapes, specs, MESH)
    # kernel 16,384 + pos_embedding 4,096 are cut 4 ways; bias 256 and head 640 are not.
    assert any_sharded
    assert "2 of 4 parameter arrays" in line and "20,480 of 21,376 parameters" in line
    # Per device: params + mu + nu, sharded ones / 4 (float32), + the Adam count (int32).
    per_device = 3 * 4 * (20_480 / 4 + 896) + 4
    assert f"per device {per_device / 1024:.1f} KiB" in line
    nothing = sharding.tree_specs(shapes, MESH, min_size=10**9)
    assert sharding.describe(shapes, nothing, MESH)[1] is False


@pytest.mark.parametrize(
    "rules, message",
    [
        ((("kernel",),), r"expected a \(regex, spec\) pair"),
        ((("(", "fsdp"),), "bad regex"),
        ((("kernel", "shard"),), "allowed strings are"),
        ((("kernel", ("model", None)),), "must be None or mesh axes"),
        (((KERNEL, (None, None, "fsdp")),), "has 3 entries but"),
        ((("head/kernel", (None, "fsdp")),), "must divide evenly"),
    ],
)
def test_bad_rules_are_clear_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        sharding.tree_specs(state_shapes(), MESH, min_size=0, rules=rules)


class _Placed:
    """Stands in for a NamedSharding (a tree leaf with a .spec): no devices needed."""

    def __init__(self, spec):
        self.spec = spec


class _Mesh:
    shape = MESH


def test_trainer_logs_what_was_sharded_and_warns_when_fsdp_shards_nothing(capsys):
    from vit_jax.train import state as train_state

    shapes = state_shapes()
    for min_size, expected in ((4096, "2 of 4 parameter arrays"), (10**9, "0 of 4 parameter")):
        specs = sharding.tree_specs(shapes, MESH, min_size=min_size)
        placed = jax.tree.map(_Placed, specs, is_leaf=lambda x: isinstance(x, P))
        train_state.log_sharding(shapes, placed, _Mesh())
        out = capsys.readouterr().out
        assert f"Sharding: {expected}" in out
        assert ("WARNING mesh.fsdp=4 but no parameter is sharded" in out) == (min_size == 10**9)


MEMORY_TABLE_CHECK = """
import sys
sys.path.insert(0, {root!r})
from vit_jax.model import vit
from vit_jax.tools import memory_table
count = vit.count_params(vit.param_shapes(vit.create_model("Ti/16", image_size=224, num_classes=1000)))
one, four = (memory_table.compiled_state_bytes("Ti/16", f, f) for f in (1, 4))
print(count, one, four)
"""


@pytest.mark.slow  # a second JAX process with 4 simulated devices and two compilations
def test_memory_table_numbers_come_from_the_compiled_state():
    out = run_with_devices(MEMORY_TABLE_CHECK.format(root=str(REPO)), devices=4)
    count, one, four = map(int, out.split()[-3:])
    # float32 params + AdamW's two moments, whole on every device; then ~a quarter of that.
    assert one == pytest.approx(3 * 4 * count, rel=1e-3)
    assert one / 4 <= four < one / 4 * 1.05
