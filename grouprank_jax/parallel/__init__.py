"""Device mesh, logical-axis rules and (multi-host) runtime setup."""

from grouprank_jax.parallel.mesh import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    host_mesh,
    logical_to_spec,
    make_mesh,
    named_sharding,
    shard,
    single_device_mesh,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "host_mesh",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "shard",
    "single_device_mesh",
]
