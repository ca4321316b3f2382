"""The device mesh and the ONE logical-axis rules table.

Model code names tensor axes logically (``("embed", "heads", "head_dim")``); this module maps
those names to the mesh axes ``data``, ``fsdp`` and ``tensor``. Switching between FSDP, tensor
and data parallelism is a change of mesh shape (or of this table), never of model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grouprank_jax.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tuple = sharded over their product; None = replicated).
# Params: embed rows are FSDP-sharded, head/mlp/vocab columns tensor-sharded (Megatron layout).
# Activations: the batch is split over data x fsdp, heads over tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", None),
    ("mlp", ("tensor",)),
    ("norm", None),
    ("lora_rank", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # KV cache [layers, batch, slots, kv_heads, head_dim]
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", ("tensor",)),
)

Rules = tuple[tuple[str, tuple[str, ...] | None], ...]


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    dims = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(d == -1 for d in dims) > 1:
        raise ValueError(f"mesh {cfg}: at most one axis may be -1")
    known = math.prod(d for d in dims if d != -1)
    if num_devices % known:
        raise ValueError(f"mesh {cfg}: {num_devices} devices are not divisible by the fixed axes ({known})")
    dims = [num_devices // known if d == -1 else d for d in dims]
    if math.prod(dims) != num_devices:
        raise ValueError(
            f"mesh data={dims[0]} x fsdp={dims[1]} x tensor={dims[2]} = {math.prod(dims)} devices, "
            f"but {num_devices} are available; use -1 on one axis to take the rest"
        )
    return tuple(dims)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A GSPMD (Auto axis types) mesh over all global devices, shaped by ``cfg``."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    if cfg.num_slices > 1:
        if shape[0] % cfg.num_slices:
            raise ValueError(f"data={shape[0]} must be a multiple of num_slices={cfg.num_slices}")
        per_slice = (shape[0] // cfg.num_slices, shape[1], shape[2])
        array = mesh_utils.create_hybrid_device_mesh(per_slice, (cfg.num_slices, 1, 1), devices)
    else:
        try:
            array = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES)


def single_device_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)


def host_mesh() -> Mesh:
    """One host CPU device, for work that needs no accelerator and may not fit one chip (HF
    import/export of a 32B model: 122 GiB in fp32): host RAM holds it, and a TPU held by a
    training job on the same VM is not needed. The default device when the CPU backend is off
    (``JAX_PLATFORMS`` without cpu)."""
    try:
        devices = jax.devices("cpu")
    except RuntimeError:
        return single_device_mesh()
    return Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), MESH_AXES)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> P:
    """PartitionSpec for logical axis names.

    A mesh axis is used at most once per tensor; when ``shape`` and ``mesh`` are given, mesh
    axes that do not divide the dimension are dropped (that dimension is replicated over them).
    ``grouprank plan`` reports those cases before a run starts.
    """
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the rules table")
        axes = [a for a in (table[name] or ()) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if mesh.shape.get(a, 1) > 1]
            if shape is not None:
                kept, size = [], 1
                for a in axes:
                    if shape[i] % (size * mesh.shape[a]) == 0:
                        kept.append(a)
                        size *= mesh.shape[a]
                axes = kept
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def named_sharding(mesh: Mesh, names, shape=None, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


# The mesh (and rules) that activation constraints refer to while a program is traced. Model
# code names logical axes only; whoever runs the model on a mesh enters ``use_mesh`` (the model
# does so itself with the mesh it was placed on, jitted steps and the sampler with theirs).
_MESH_CONTEXT: contextvars.ContextVar[tuple[Mesh | None, Rules]] = contextvars.ContextVar(
    "grouprank_mesh", default=(None, LOGICAL_AXIS_RULES)
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = LOGICAL_AXIS_RULES):
    """Make ``mesh`` the target of ``shard`` (and of splash's shard_map) inside the block."""
    token = _MESH_CONTEXT.set((mesh, rules))
    try:
        yield mesh
    finally:
        _MESH_CONTEXT.reset(token)


def current_mesh() -> tuple[Mesh | None, Rules]:
    """(mesh, rules) of the innermost ``use_mesh``; (None, default rules) outside any."""
    return _MESH_CONTEXT.get()


def shard(x: jax.Array, names: Sequence[str | None]):
    """``with_sharding_constraint`` by logical names against the current mesh; a real
    constraint on any backend, CPU included; a no-op without a mesh (or on one device)."""
    mesh, rules = _MESH_CONTEXT.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))


def per_chip_bytes(tree) -> int:
    """Bytes one device holds of a pytree of (possibly abstract) sharded arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def tpu_reserved_hbm_options(mesh: Mesh | None, reserved_bytes: int) -> dict:
    """Compiler options telling TPU XLA that ``reserved_bytes`` per chip are taken by state that
    lives beside a program (its scheduler otherwise plans with the whole HBM free); empty off TPU."""
    if mesh is None or mesh.devices.flat[0].platform != "tpu" or reserved_bytes <= 0:
        return {}
    return {"xla_tpu_user_reserved_hbm_bytes": str(int(reserved_bytes))}
