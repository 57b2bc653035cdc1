"""Mesh, parameter placement (replicated / FSDP), global batches and device prefetch.

The multi-device checks run in a subprocess with 8 simulated CPU devices: XLA reads the device-count
flag only when JAX starts.
"""

import jax
import numpy as np
import pytest
from helpers import run_with_devices
from jax.sharding import PartitionSpec as P

from vit_jax import sharding


def test_mesh_sizes_fill_in_minus_one_and_reject_bad_shapes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    fake_devices = list(range(8))  # the checks run before any device is touched
    with pytest.raises(ValueError, match="needs 6 devices but there are 8"):
        sharding.make_mesh({"data": 3, "fsdp": 2}, fake_devices)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.make_mesh({"data": -1, "fsdp": 3}, fake_devices)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "fsdp": -1}, fake_devices)
    with pytest.raises(ValueError, match="unknown axes.*model"):
        sharding.make_mesh({"data": -1, "model": 2}, fake_devices)


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((768, 3072), 4, min_size=0) == P(None, "fsdp")
    assert sharding.fsdp_spec((3072, 768), 4, min_size=0) == P("fsdp", None)
    # 3 heads of 64: the largest dimension divisible by 4 is 192 (the width), not 3.
    assert sharding.fsdp_spec((192, 3, 64), 4, min_size=0) == P("fsdp", None, None)
    assert sharding.fsdp_spec((10, 6), 4, min_size=0) == P()  # nothing divisible: replicate
    assert sharding.fsdp_spec((768,), 4, min_size=1024) == P()  # small: replicate
    assert sharding.fsdp_spec((768, 3072), 1, min_size=0) == P()  # no fsdp axis


def test_batch_size_must_split_over_devices():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    sharding.check_batch_size(8 * jax.device_count(), mesh)
    with pytest.raises(ValueError, match="config.batch_size=0"):
        sharding.check_batch_size(0, mesh)


def test_global_batch_and_prefetch_keep_order_and_values():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    local = [{"image": np.full((4, 2), i, np.float32), "label": np.arange(4) + i} for i in range(5)]
    for size in (0, 2):
        got = list(sharding.prefetch_to_device(iter(local), mesh, size=size))
        assert len(got) == 5
        for i, batch in enumerate(got):
            assert isinstance(batch["image"], jax.Array)
            assert batch["image"].sharding.spec == P(("data", "fsdp"))
            np.testing.assert_array_equal(batch["image"], local[i]["image"])
            np.testing.assert_array_equal(batch["label"], local[i]["label"])


def test_prefetch_reads_ahead_by_its_size():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    pulled = []

    def source():
        for i in range(10):
            pulled.append(i)
            yield {"x": np.full((2,), i)}

    batches = sharding.prefetch_to_device(source(), mesh, size=3)
    next(batches)
    assert pulled == [0, 1, 2, 3]  # three ahead of the one being used


def test_eight_devices_fsdp_placement_and_global_batch():
    out = run_with_devices(
        """
        import jax, jax.numpy as jnp, numpy as np
        import vit_jax
        from vit_jax.model import vit
        from vit_jax import sharding
        assert jax.device_count() == 8
        mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
        assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
        model = vit_jax.create_model(None, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                                     patch_size=4, image_size=16, num_classes=10)
        shapes = vit.param_shapes(model)
        shards = sharding.tree_shardings(shapes, mesh, fsdp_min_size=512)
        mlp = shards["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
        assert mlp["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp"), mlp["kernel"].spec
        assert mlp["bias"].spec == jax.sharding.PartitionSpec(), mlp["bias"].spec  # 64 < 512

        # Params created sharded compute what replicated params compute.
        params = vit.init_params(model, jax.random.key(0))
        params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
        fsdp_params = jax.device_put(params, shards)
        kernel = fsdp_params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
        assert kernel.addressable_shards[0].data.shape == (32, 16)

        local = {"image": np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 3)).astype("f4")}
        batch = sharding.make_global_batch(local, mesh)
        assert len(batch["image"].addressable_shards) == 8
        assert batch["image"].addressable_shards[3].data.shape == (2, 16, 16, 3)
        np.testing.assert_array_equal(batch["image"], local["image"])
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
        np.testing.assert_allclose(apply(fsdp_params, batch["image"]),
                                   model.apply({"params": params}, local["image"]), rtol=1e-4, atol=1e-5)

        # Gradient accumulation: every micro-batch is spread over all 8 devices (strided rows).
        from vit_jax.train.step import split_micro_batches
        rows = sharding.make_global_batch({"x": np.arange(32.0)}, mesh)["x"]
        micro = jax.jit(lambda x: split_micro_batches(x, 4, mesh))(rows)
        assert micro.shape == (4, 8)
        np.testing.assert_array_equal(micro[1], np.arange(32.0)[1::4])
        assert micro.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
        print("OK")
        """
    )
    assert out.strip().endswith("OK")
