"""The one projection module of the decoder: an einsum with a head-split kernel, an optional bias
and an optional LoRA adapter.

Every linear map of the model (q/k/v/o, gate/up/down) is a ``Projection``; the einsum string
documents the layout (``btd,dnh->btnh``). LoRA lives inside it as a ``LoRA`` submodule, so the
adapter's parameters have fixed paths (``layers.3.attn.q_proj.lora.a``) and the base kernel's
path does not depend on whether a run adapts it. With ``use_lora=False`` the projection computes
its base weights only: GRPO's reference policy without a second copy of the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def normal_param(rngs: nnx.Rngs, shape, axes, dtype, std: float) -> nnx.Param:
    """A weight drawn from normal(0, std) (HF's ``initializer_range``), stored in ``dtype``."""
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class LoRA(nnx.Module):
    """``scale * (x @ A) @ B`` on activations (``A @ B`` is never materialised).

    A ``[in..., r]`` starts at normal(0, 1/sqrt(fan_in)), B ``[r, out...]`` at zero, so an adapted
    model starts exactly at its base weights.
    """

    def __init__(self, in_shape, out_shape, in_axes, out_axes, rank: int, alpha: float, dtype, rngs: nnx.Rngs):
        fan_in = math.prod(in_shape)
        a = jax.random.normal(rngs.params(), (*in_shape, rank), jnp.float32) / math.sqrt(fan_in)
        self.a = nnx.LoRAParam(a.astype(dtype), logical_axes=(*in_axes, "lora_rank"))
        self.b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), dtype), logical_axes=("lora_rank", *out_axes))
        self.scale = alpha / rank
        self.in_dims = len(in_shape)

    def __call__(self, x):
        a = self.a[...].astype(x.dtype)
        xa = jnp.tensordot(x, a, axes=self.in_dims)  # [B, T, r]
        return self.scale * jnp.tensordot(xa, self.b[...].astype(x.dtype), axes=1)

    def merged_delta(self):
        """``scale * A @ B`` in fp32, shaped like the kernel (for export)."""
        return self.scale * jnp.tensordot(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32), axes=1)


class Projection(nnx.Module):
    """``einsum(equation, x, kernel) [+ bias] [+ LoRA(x)]`` in the activations' dtype.

    ``kernel_axes`` name the kernel's logical axes; its first ``in_dims`` dimensions are
    contracted with ``x``'s last ones. ``lora_rank > 0`` adds the adapter.
    """

    def __init__(
        self,
        equation: str,
        shape,
        kernel_axes,
        *,
        in_dims: int,
        param_dtype,
        std: float,
        rngs: nnx.Rngs,
        bias: bool = False,
        lora_rank: int = 0,
        lora_alpha: float = 32.0,
    ):
        self.equation = equation
        self.kernel = normal_param(rngs, tuple(shape), kernel_axes, param_dtype, std)
        out_shape, out_axes = tuple(shape[in_dims:]), tuple(kernel_axes[in_dims:])
        self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype), logical_axes=out_axes) if bias else None
        self.lora = (
            LoRA(
                tuple(shape[:in_dims]),
                out_shape,
                tuple(kernel_axes[:in_dims]),
                out_axes,
                lora_rank,
                lora_alpha,
                param_dtype,
                rngs,
            )
            if lora_rank
            else None
        )

    def __call__(self, x, use_lora: bool = True):
        dt = x.dtype
        y = jnp.einsum(self.equation, x, self.kernel[...].astype(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        if self.lora is not None and use_lora:
            y = y + self.lora(x)
        return y
