"""Multi-process start-up and the few host-level collectives the trainers need.

One Python process per host (TPU VM worker, SLURM node) or per GPU. ``initialize_distributed``
must run before anything touches a JAX backend; afterwards ``jax.devices()`` lists every
chip of the job and a ``Mesh`` built from it spans all hosts.

Where the layout comes from, first match wins:
1. explicit arguments;
2. ``GROUPRANK_COORDINATOR`` / ``GROUPRANK_NUM_PROCESSES`` / ``GROUPRANK_PROCESS_ID`` (set by
   ``launch/local_multiprocess.sh`` and ``launch/gpu_slurm.sbatch``);
3. JAX's own cluster detection (TPU VM metadata, SLURM, Open MPI) via
   ``jax.distributed.initialize()`` with no arguments, when those environments are detected;
4. otherwise a single process: nothing to do.

``GROUPRANK_HEARTBEAT_TIMEOUT`` (seconds, JAX's default 100) sets how long the coordination
service waits for a silent process before it stops the whole job. Raise it where hosts are
oversubscribed (CI runners, shared login nodes) and a busy process can miss heartbeats.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grouprank_jax.parallel.mesh import logical_to_spec

log = logging.getLogger(__name__)

_ENV_COORD, _ENV_NUM, _ENV_ID = "GROUPRANK_COORDINATOR", "GROUPRANK_NUM_PROCESSES", "GROUPRANK_PROCESS_ID"
_ENV_LOCAL_DEVICES = "GROUPRANK_LOCAL_DEVICE_IDS"
_ENV_HEARTBEAT = "GROUPRANK_HEARTBEAT_TIMEOUT"
# Markers of clusters whose layout jax.distributed.initialize() discovers by itself.
# (multi-host TPU VMs are recognised by their worker list, see _multi_host_tpu).
_AUTO_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")

_initialized = False


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} must be an integer") from None


def _multi_host_tpu() -> bool:
    # TPU VM workers of a multi-host slice list every worker; a single-host VM lists one.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join the multi-process job; returns True when more than one process takes part.

    Idempotent: a second call (or a call after JAX was initialised elsewhere) only logs.
    """
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get(_ENV_COORD) or None
    num_processes = num_processes if num_processes is not None else _env_int(_ENV_NUM)
    process_id = process_id if process_id is not None else _env_int(_ENV_ID)
    if local_device_ids is None and os.environ.get(_ENV_LOCAL_DEVICES):
        local_device_ids = [int(x) for x in os.environ[_ENV_LOCAL_DEVICES].split(",")]

    heartbeat = _env_int(_ENV_HEARTBEAT)
    timeouts = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}

    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if num_processes == 1 and coordinator_address is None:
            _initialized = True
            _log_layout()
            return False
        missing = [n for n, x in zip((_ENV_COORD, _ENV_NUM, _ENV_ID), explicit) if x is None]
        if missing:
            raise ValueError(
                f"multi-process start needs coordinator, process count and process id; missing {missing} "
                "(pass --coordinator/--num-processes/--process-id or set the variables)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            **timeouts,
        )
    elif _multi_host_tpu() or any(m in os.environ for m in _AUTO_MARKERS):
        # JAX reads the layout from the TPU metadata server / SLURM / MPI variables.
        jax.distributed.initialize(local_device_ids=local_device_ids, **timeouts)
    _initialized = True
    _log_layout()
    return jax.process_count() > 1


def _log_layout() -> None:
    log.info(
        "process %d of %d: %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )


def is_primary() -> bool:
    """True on the process that writes logs, metrics and exports (process 0)."""
    return jax.process_index() == 0


def global_batch_from_local(
    local_tree: Any,
    mesh: Mesh,
    spec: PartitionSpec | Sequence[str | None] | None = None,
) -> Any:
    """Assemble each process's slice of the batch into global ``jax.Array`` s.

    ``local_tree`` holds numpy arrays whose leading axis is this process's rows (the global
    batch is the concatenation over processes, in process order). ``spec`` is a
    ``PartitionSpec`` or logical axis names (default: rows split over ``data`` x ``fsdp``,
    everything else replicated).
    """

    def one(x):
        x = np.asarray(x)
        if spec is None:
            pspec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
        elif isinstance(spec, PartitionSpec):
            pspec = spec
        else:
            pspec = logical_to_spec(tuple(spec) + (None,) * (x.ndim - len(spec)))
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(NamedSharding(mesh, pspec), x, global_shape)

    return jax.tree.map(one, local_tree)


def allreduce_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Mean of each scalar over processes (every process must pass the same keys)."""
    if jax.process_count() == 1:
        return {k: float(v) for k, v in metrics.items()}

    keys = sorted(metrics)
    values = np.asarray([float(metrics[k]) for k in keys], np.float32)  # x64 is off by default
    gathered = np.asarray(multihost_utils.process_allgather(values))  # [processes, len(keys)]
    if gathered.shape != (jax.process_count(), len(keys)):
        raise ValueError(f"processes passed different metric sets (gathered shape {gathered.shape}); keys here: {keys}")
    return {k: float(v) for k, v in zip(keys, gathered.mean(axis=0))}


def sync_global_devices(name: str) -> None:
    """Barrier across processes (e.g. before the primary reads what all of them wrote)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree_max(value: int) -> int:
    """The largest ``value`` over processes: shape choices (bucket lengths) that every process
    must make alike before a collective computation."""
    if jax.process_count() == 1:
        return int(value)

    return int(np.max(multihost_utils.process_allgather(np.asarray(int(value), np.int32))))


def global_sum(value: float) -> float:
    """``value`` summed over processes."""
    return float(gather_rows(np.asarray([value], np.float32)).sum())


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate each process's rows (same shape on every process) in process order."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's contiguous block of rows of a global array sharded on axis 0 (the rows
    it passed to ``make_array_from_process_local_data``), as numpy; the whole array when it is
    fully addressable."""
    if array.is_fully_addressable:
        return np.asarray(array)
    blocks: dict[int, np.ndarray] = {}
    for shard in array.addressable_shards:
        rows = shard.index[0] if shard.index else slice(None)
        start = rows.start or 0
        if start not in blocks:
            blocks[start] = np.asarray(shard.data)
    starts = sorted(blocks)
    out = np.concatenate([blocks[s] for s in starts], axis=0)
    ends = [s + len(blocks[s]) for s in starts]
    if any(e != s for e, s in zip(ends[:-1], starts[1:])):
        raise ValueError(
            f"this process's rows of the {array.shape} array are not contiguous (shards start at "
            f"{starts}); order the mesh so each process's devices hold one block of the batch axis"
        )
    return out
