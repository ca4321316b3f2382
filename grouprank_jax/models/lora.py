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


def merged_kernels(model) -> dict[tuple, np.ndarray]:
    """NNX path of each adapted kernel -> ``W + scale * A @ B`` (host numpy, fp32 math). In a
    multi-process job every process must call it (the gathers are collective)."""
    out = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Projection) and module.lora is not None:
            kernel = module.kernel.get_value()
            merged = _host(kernel).astype(np.float32) + _host(module.lora.merged_delta())
            out[tuple(path) + ("kernel",)] = merged.astype(jnp.dtype(kernel.dtype))
    return out


def lora_filter():
    """The NNX filter of trainable variables in a LoRA run."""
    return nnx.LoRAParam


def base_filter():
    """Full-weight params (everything that is a Param but not an adapter)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
