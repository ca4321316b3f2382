"""A real 2-process x 4-CPU-device job on localhost (gloo collectives), checked against the
same computation in one process: ``initialize_distributed`` from the GROUPRANK_* variables,
``global_batch_from_local``, ``allreduce_metrics`` and a jitted computation sharded over both
processes' devices."""

import textwrap
import time

import numpy as np
import pytest

from grouprank_jax.parallel import distributed as dist

from mp_workers import run_workers

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))
    sys.path.insert(0, sys.argv[1])
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from grouprank_jax.config import MeshConfig
    from grouprank_jax.parallel import distributed as dist
    from grouprank_jax.parallel.mesh import make_mesh

    multi = dist.initialize_distributed()
    assert dist.initialize_distributed() == multi  # idempotent
    pid, n = jax.process_index(), jax.process_count()
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2))
    rows = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)  # the global batch
    local = rows[pid * 8 // n:(pid + 1) * 8 // n]
    batch = dist.global_batch_from_local({"x": local}, mesh)
    w = jax.device_put(jnp.linspace(-1, 1, 6 * 4, dtype=jnp.float32).reshape(6, 4),
                       NamedSharding(mesh, P(None, "tensor")))

    @jax.jit
    def f(x, w):
        y = jnp.tanh(x @ w)
        return jnp.sum(y, axis=0), jnp.mean(y)

    col, mean = f(batch["x"], w)
    col = np.asarray(jax.experimental.multihost_utils.process_allgather(col, tiled=True))
    metrics = dist.allreduce_metrics({"pid": float(pid), "mean": float(mean)})
    dist.sync_global_devices("done")
    print("RESULT " + json.dumps({"pid": pid, "n": n, "devices": jax.device_count(),
          "shape": list(batch["x"].shape), "col": col.tolist(), "metrics": metrics,
          "primary": dist.is_primary()}))
    """
)


def test_two_processes_match_one():
    start = time.perf_counter()
    multi = run_workers(WORKER, 2)
    single = run_workers(WORKER, 1)[0]
    elapsed = time.perf_counter() - start
    assert [r["pid"] for r in multi] == [0, 1]
    assert [r["primary"] for r in multi] == [True, False]
    for r in multi:
        assert r["n"] == 2 and r["devices"] == 8 and r["shape"] == [8, 6]
        np.testing.assert_allclose(r["col"], single["col"], rtol=1e-6)
        np.testing.assert_allclose(r["metrics"]["mean"], single["metrics"]["mean"], rtol=1e-6)
        assert r["metrics"]["pid"] == 0.5  # mean of process ids 0 and 1
    assert single["n"] == 1 and single["devices"] == 8
    assert elapsed < 60, f"multi-process test took {elapsed:.1f}s"


def test_heartbeat_timeout_reaches_jax(monkeypatch):
    """GROUPRANK_HEARTBEAT_TIMEOUT becomes jax.distributed.initialize's heartbeat_timeout_seconds.

    jax.distributed.initialize is replaced by a recorder (a test double): the real one would join
    a coordinator, which the two-process tests above exercise.
    """
    calls = []
    monkeypatch.setattr(dist, "_initialized", False)
    monkeypatch.setattr(dist.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("GROUPRANK_HEARTBEAT_TIMEOUT", "600")
    dist.initialize_distributed("127.0.0.1:1", 2, 0)
    assert calls[-1]["heartbeat_timeout_seconds"] == 600
    monkeypatch.setattr(dist, "_initialized", False)
    monkeypatch.delenv("GROUPRANK_HEARTBEAT_TIMEOUT")
    dist.initialize_distributed("127.0.0.1:1", 2, 0)
    assert "heartbeat_timeout_seconds" not in calls[-1]  # JAX's own default
    monkeypatch.setattr(dist, "_initialized", False)
    monkeypatch.setenv("GROUPRANK_HEARTBEAT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GROUPRANK_HEARTBEAT_TIMEOUT"):
        dist.initialize_distributed("127.0.0.1:1", 2, 0)
