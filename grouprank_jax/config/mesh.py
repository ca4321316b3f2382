"""``MeshConfig``: the device mesh a run asks for (``parallel/mesh.py`` builds it)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. ``-1`` on one axis takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Multi-slice (TPU) or multi-node data parallelism across slices: the ``data`` axis is
    # laid out over this many slices via ``mesh_utils.create_hybrid_device_mesh``.
    num_slices: int = 1
