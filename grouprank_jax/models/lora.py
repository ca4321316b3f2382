"""LoRA helpers: which variables train, and merging adapters into full weights for export."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from grouprank_jax.models.qwen2 import _KERNEL_OF


def merged_kernels(model) -> dict[tuple, np.ndarray]:
    """NNX path of each adapted kernel -> ``W + scale * A @ B`` (host numpy, fp32 math)."""
    cfg = model.cfg
    if not cfg.lora_rank:
        return {}
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, variable in flat.items():
        name = path[-1]
        if not isinstance(name, str) or not name.endswith("_lora_a"):
            continue
        proj = name[: -len("_lora_a")]
        owner = path[:-1]
        a = np.asarray(variable.get_value(), np.float32)
        b = np.asarray(flat[owner + (f"{proj}_lora_b",)].get_value(), np.float32)
        kernel_path = owner + (_KERNEL_OF[proj],)
        kernel = flat[kernel_path].get_value()
        delta = np.tensordot(a, b, axes=1) * cfg.lora_scale
        out[kernel_path] = (np.asarray(kernel, np.float32) + delta).astype(jnp.dtype(kernel.dtype))
    return out


def lora_filter():
    """The NNX filter of trainable variables in a LoRA run."""
    return nnx.LoRAParam


def base_filter():
    """Full-weight params (everything that is a Param but not an adapter)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
