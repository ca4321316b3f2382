"""LoRA helpers: which variables train, and merging adapters into full weights for export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from grouprank_jax.models.projection import Projection


def _host(array) -> np.ndarray:
    # A weight sharded over several processes is gathered (collective: every process calls).
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def adapted_projections(model) -> dict[tuple, Projection]:
    """NNX path of each kernel that carries a LoRA adapter -> its ``Projection``."""
    return {
        tuple(path) + ("kernel",): module
        for path, module in nnx.iter_graph(model)
        if isinstance(module, Projection) and module.lora is not None
    }


def merged_kernel(module: Projection) -> np.ndarray:
    """``W + scale * A @ B`` of one adapted projection (host numpy, fp32 math, W's dtype). In a
    multi-process job every process must call it (the gathers are collective)."""
    kernel = module.kernel.get_value()
    merged = _host(kernel).astype(np.float32) + _host(module.lora.merged_delta())
    return merged.astype(jnp.dtype(kernel.dtype))


def merged_kernels(model) -> dict[tuple, np.ndarray]:
    """NNX path of each adapted kernel -> its ``merged_kernel`` (all at once: host memory for
    every adapted kernel; the HF export merges one at a time instead)."""
    return {path: merged_kernel(module) for path, module in adapted_projections(model).items()}


def lora_filter():
    """The NNX filter of trainable variables in a LoRA run."""
    return nnx.LoRAParam


def base_filter():
    """Full-weight params (everything that is a Param but not an adapter)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
