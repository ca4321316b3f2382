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


# Where XLA:CPU gets the tied head faster as a broadcast multiply and row reduce than as a dot:
# rows (tokens) in CPU_ROWWISE_HEAD_ROWS and a width of at least CPU_ROWWISE_HEAD_MIN_WIDTH. At a
# handful of rows its dot costs ~2.5x reading the table once; the reduce reads it once, then
# transposes its [V, rows] result. Head alone, 151,936-token fp32 table, this repo's 2-core CI
# machine (2026-12-05), dot -> reduce: width 256: 2 rows 10.3 -> 8.5 ms, 8 rows 12.9 -> 9.1;
# width 896: 8 rows 47.2 -> 30.8. At 1 row the dot is a GEMV already and the reduce ~25x slower;
# at width 64 the transpose eats the gain. At 16 rows the head alone gains (16.2 -> 12.6 ms) but
# the decode step does not (28.4 vs 27.7 ms, 4 layers): the greedy op's row reductions over the
# transposed result get slow (head + greedy op alone: 24 -> 42 ms).
CPU_ROWWISE_HEAD_ROWS = (2, 8)
CPU_ROWWISE_HEAD_MIN_WIDTH = 256


def tied_head_logits(hidden, embed, platform: str):
    """fp32 logits ``[..., V]`` from hidden states ``[..., D]`` and the tied table ``embed [V, D]``.

    On ``platform == "cpu"`` for a few rows at a real model's width (the ``CPU_ROWWISE_HEAD_*``
    bounds: a small batch's decode step, or its prefill's last positions) each logit is reduced
    from the table's row in place, which reads the table once; everywhere else (TPU/GPU, training
    batches, one row, more than 8) it is one dot, the shape the MXU and tensor cores want.
    """
    h = hidden.astype(jnp.float32)
    table = embed.astype(jnp.float32)
    rows, width = math.prod(h.shape[:-1]), h.shape[-1]
    low, high = CPU_ROWWISE_HEAD_ROWS
    if platform != "cpu" or not low <= rows <= high or width < CPU_ROWWISE_HEAD_MIN_WIDTH:
        return jnp.einsum("...d,vd->...v", h, table)
    flat = h.reshape(rows, width)  # [rows, D]
    # [V, rows, D] is never written: XLA fuses the product into the reduce over D
    per_vocab = jnp.sum(table[:, None, :] * flat[None, :, :], axis=-1)  # [V, rows]
    return per_vocab.T.reshape(*h.shape[:-1], table.shape[0])
