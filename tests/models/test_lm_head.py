"""The tied LM head's two formulations: the same logits, and each used where it is meant to be."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grouprank_jax.config.mesh import MeshConfig
from grouprank_jax.models.projection import CPU_ROWWISE_HEAD_MIN_WIDTH, CPU_ROWWISE_HEAD_ROWS, tied_head_logits
from grouprank_jax.parallel.mesh import make_mesh


@pytest.mark.parametrize("rows", [1, 2, 8, 9, 16])
@pytest.mark.parametrize("width", [64, 256])
@pytest.mark.parametrize("platform", ["cpu", "tpu", "gpu"])
def test_tied_head_matches_a_float64_reference_and_reduces_rowwise_only_for_small_cpu_batches(rows, width, platform):
    rng = np.random.default_rng(rows)
    table = rng.normal(size=(1000, width)).astype(np.float32)  # [V, D]
    hidden = rng.normal(size=(rows, 1, width)).astype(np.float32)  # [rows, 1, D]: a decode step
    want = np.einsum("btd,vd->btv", hidden.astype(np.float64), table.astype(np.float64))

    head = jax.jit(functools.partial(tied_head_logits, platform=platform))
    got = np.asarray(head(hidden, table))
    assert got.dtype == np.float32 and got.shape == want.shape
    # logits have std sqrt(width) (16 at 256): fp32 sums of 256 products are good to ~1e-5 of that,
    # for the dot as for the reduce
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # bf16 tables are read as stored and widened in the product
    got_bf16 = np.asarray(head(hidden, jnp.asarray(table, jnp.bfloat16)))
    want_bf16 = np.einsum("btd,vd->btv", hidden, np.asarray(jnp.asarray(table, jnp.bfloat16), np.float32))
    np.testing.assert_allclose(got_bf16, want_bf16, rtol=1e-5, atol=1e-4)

    low, high = CPU_ROWWISE_HEAD_ROWS
    rowwise = platform == "cpu" and low <= rows <= high and width >= CPU_ROWWISE_HEAD_MIN_WIDTH
    program = head.lower(hidden, table).as_text()
    assert ("dot_general" not in program) == rowwise, program


def test_rowwise_tied_head_on_8_devices_equals_one_device():
    """The CPU row-reduce form with the table split over vocab (tensor) and width (fsdp) and the
    rows over data, as a sharded sampler holds them: the same logits as one device."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1024, 256)).astype(np.float32)
    hidden = rng.normal(size=(8, 1, 256)).astype(np.float32)
    head = jax.jit(functools.partial(tied_head_logits, platform="cpu"))
    assert "dot_general" not in head.lower(hidden, table).as_text()
    one_device = np.asarray(head(hidden, table))

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.devices.size == 8
    sharded = np.asarray(
        head(
            jax.device_put(hidden, NamedSharding(mesh, P("data", None, "fsdp"))),
            jax.device_put(table, NamedSharding(mesh, P("tensor", "fsdp"))),
        )
    )
    np.testing.assert_allclose(sharded, one_device, rtol=1e-5, atol=1e-4)
