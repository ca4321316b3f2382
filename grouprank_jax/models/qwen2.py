"""The Qwen2 / Qwen2.5 decoder in Flax NNX.

Computes what HF transformers' ``Qwen2ForCausalLM`` computes: RMSNorm with fp32 statistics,
half-split RoPE with fp32 angles, grouped-query attention (q/k/v bias, no o bias) that never
repeats KV heads, a SwiGLU MLP and a tied or untied LM head. Weights are head-split so the
einsum strings document every layout (``BTD,DNH->BTNH``). Every parameter carries logical
axis names (``Param(..., logical_axes=...)``) that ``parallel/mesh.py``'s one rules table maps
to the mesh; model code never names a device axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.attention import attend
from grouprank_jax.models.kv_cache import KVCache
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, Rules, shard

def _dtype(name: str):
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal", std: float = 0.02):
    """A parameter: zeros, ones, or normal(0, std) (``ModelConfig.initializer_range``)."""
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _kernel(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes):
    """A weight matrix drawn from normal(0, ``cfg.initializer_range``) in ``cfg.param_dtype``."""
    return _param(rngs, shape, axes, _dtype(cfg.param_dtype), std=cfg.initializer_range)


def _add_lora(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, name: str, kernel_axes, in_dims: int):
    """Adapters ``{name}_lora_a`` [in..., r] and ``{name}_lora_b`` [r, out...] for one projection.

    B starts at zero so an adapted model starts exactly at its base weights.
    """
    if not cfg.lora_rank or name not in cfg.lora_targets:
        return
    module.lora_scale = cfg.lora_scale
    kernel = getattr(module, _KERNEL_OF[name])
    shape = kernel.get_value().shape
    in_shape, out_shape = shape[:in_dims], shape[in_dims:]
    pd = _dtype(cfg.param_dtype)
    fan_in = int(np.prod(in_shape))
    a = jax.random.normal(rngs.params(), (*in_shape, cfg.lora_rank), jnp.float32) / np.sqrt(fan_in)
    setattr(module, f"{name}_lora_a", nnx.LoRAParam(a.astype(pd), logical_axes=(*kernel_axes[:in_dims], "lora_rank")))
    setattr(module, f"{name}_lora_b", nnx.LoRAParam(
        jnp.zeros((cfg.lora_rank, *out_shape), pd), logical_axes=("lora_rank", *kernel_axes[in_dims:])
    ))


_KERNEL_OF = {
    "q_proj": "q_kernel", "k_proj": "k_kernel", "v_proj": "v_kernel", "o_proj": "o_kernel",
    "gate_proj": "gate_kernel", "up_proj": "up_kernel", "down_proj": "down_kernel",
}


def _lora_delta(module: nnx.Module, name: str, x, ctx):
    """``scale * (x @ A) @ B`` computed on activations (never materialises A @ B), or 0."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None or not ctx.get("use_lora", True):
        return 0.0
    b = getattr(module, f"{name}_lora_b")
    dt = x.dtype
    a_val = a[...]
    xa = jnp.tensordot(x, a_val.astype(dt), axes=a_val.ndim - 1)  # [B, T, r]
    return module.lora_scale * jnp.tensordot(xa, b[...].astype(dt), axes=1)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.weight = _param(None, (dim,), ("norm",), param_dtype, init="ones")

    def __call__(self, x):
        # Statistics in fp32; the scale multiplies the normalised value cast back (as HF does).
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rotary_embedding(positions, head_dim: int, theta: float):
    """cos, sin ``[B, T, head_dim]`` in fp32 (bf16 positions would be catastrophic at 24k)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """HF's half-split rotation: ``x * cos + rotate_half(x) * sin``; x [B, T, heads, H]."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_index: int, mesh: Mesh | None, rules: Rules):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = _dtype(cfg.param_dtype)
        self.cfg, self.layer_index, self.mesh, self.rules = cfg, layer_index, mesh, rules
        self.q_kernel = _kernel(rngs, cfg, (d, n, h), ("embed", "heads", "head_dim"))
        self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), pd, init="zeros")
        self.k_kernel = _kernel(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
        self.v_kernel = _kernel(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
        self.o_kernel = _kernel(rngs, cfg, (n, h, d), ("heads", "head_dim", "embed"))
        _add_lora(self, cfg, rngs, "q_proj", ("embed", "heads", "head_dim"), 1)
        _add_lora(self, cfg, rngs, "k_proj", ("embed", "kv_heads", "head_dim"), 1)
        _add_lora(self, cfg, rngs, "v_proj", ("embed", "kv_heads", "head_dim"), 1)
        _add_lora(self, cfg, rngs, "o_proj", ("heads", "head_dim", "embed"), 2)

    def __call__(self, x, cos, sin, ctx, cache_kv):
        cfg, dt = self.cfg, x.dtype
        mesh, rules = self.mesh, self.rules
        q = jnp.einsum("btd,dnh->btnh", x, self.q_kernel[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("btd,dkh->btkh", x, self.k_kernel[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("btd,dkh->btkh", x, self.v_kernel[...].astype(dt)) + self.v_bias[...].astype(dt)
        q = q + _lora_delta(self, "q_proj", x, ctx)
        k = k + _lora_delta(self, "k_proj", x, ctx)
        v = v + _lora_delta(self, "v_proj", x, ctx)
        q = shard(apply_rotary(q, cos, sin), ("batch", "length", "act_heads", "head_dim"), mesh, rules)
        k = shard(apply_rotary(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"), mesh, rules)
        v = shard(v, ("batch", "length", "act_kv_heads", "head_dim"), mesh, rules)

        if cache_kv is None or x.shape[1] > 1:
            # Full-sequence attention (training, scoring, prefill).
            out = attend(
                q, k, v, ctx["q_slot"], ctx["q_slot"][0], ctx["kv_valid"], ctx["segment_ids"], ctx["segment_ids"],
                impl=cfg.attention_impl, block_size=cfg.attention_block_size, mesh=mesh, rules=rules,
                splash_block_size=cfg.splash_block_size, splash_interpret=cfg.splash_interpret,
            )
            start = 0
        else:
            start = ctx["cache_index"]
        if cache_kv is not None:
            # In-place write of this layer's new keys/values into the stacked, donated buffers.
            all_k, all_v = cache_kv
            at = (self.layer_index, 0, start, 0, 0)
            all_k = jax.lax.dynamic_update_slice(all_k, k[None].astype(all_k.dtype), at)
            all_v = jax.lax.dynamic_update_slice(all_v, v[None].astype(all_v.dtype), at)
            cache_kv = (all_k, all_v)
            if x.shape[1] == 1:
                slots = jnp.arange(all_k.shape[2], dtype=jnp.int32)
                out = attend(
                    q, all_k[self.layer_index].astype(dt), all_v[self.layer_index].astype(dt), ctx["q_slot"], slots,
                    ctx["kv_valid"], impl=cfg.attention_impl, block_size=cfg.attention_block_size, is_decode=True,
                    mesh=mesh, rules=rules,
                )
        out = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(dt)) + _lora_delta(self, "o_proj", out, ctx)
        return out, cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh: Mesh | None, rules: Rules):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.mesh, self.rules = mesh, rules
        self.gate_kernel = _kernel(rngs, cfg, (d, f), ("embed", "mlp"))
        self.up_kernel = _kernel(rngs, cfg, (d, f), ("embed", "mlp"))
        self.down_kernel = _kernel(rngs, cfg, (f, d), ("mlp", "embed"))
        _add_lora(self, cfg, rngs, "gate_proj", ("embed", "mlp"), 1)
        _add_lora(self, cfg, rngs, "up_proj", ("embed", "mlp"), 1)
        _add_lora(self, cfg, rngs, "down_proj", ("mlp", "embed"), 1)

    def __call__(self, x, ctx):
        dt = x.dtype
        gate = jnp.einsum("btd,df->btf", x, self.gate_kernel[...].astype(dt)) + _lora_delta(self, "gate_proj", x, ctx)
        up = jnp.einsum("btd,df->btf", x, self.up_kernel[...].astype(dt)) + _lora_delta(self, "up_proj", x, ctx)
        hidden = shard(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"), self.mesh, self.rules)
        out = jnp.einsum("btf,fd->btd", hidden, self.down_kernel[...].astype(dt))
        return out + _lora_delta(self, "down_proj", hidden, ctx)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_index: int, mesh: Mesh | None, rules: Rules):
        pd = _dtype(cfg.param_dtype)
        self.mesh, self.rules = mesh, rules
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.attn = Attention(cfg, rngs, layer_index, mesh, rules)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.mlp = MLP(cfg, rngs, mesh, rules)

    def __call__(self, x, cos, sin, ctx, cache_kv):
        attn_out, cache_kv = self.attn(self.input_norm(x), cos, sin, ctx, cache_kv)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), ctx)
        x = shard(x, ("batch", "length", "act_embed"), self.mesh, self.rules)
        return x, cache_kv


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_layer(layer, x, cos, sin, ctx, cache_kv, use_lora: bool):
    return layer(x, cos, sin, {**ctx, "use_lora": use_lora}, cache_kv)


class Qwen2ForCausalLM(nnx.Module):
    """``model(input_ids, attention_mask=...)`` -> fp32 logits ``[B, T, vocab]``.

    Optional: ``positions`` [B, T] (default: derived from the mask as HF generation does,
    ``cumsum(mask) - 1``), ``segment_ids`` [B, T] for packed rows (0 = padding), ``cache`` (a
    ``KVCache``; then ``(logits, cache)`` is returned), ``return_hidden`` (final normed hidden
    states instead of logits, for losses that apply the LM head blockwise), ``use_lora`` (False
    runs the base weights only, i.e. the reference policy of a LoRA run).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None, rules: Rules = LOGICAL_AXIS_RULES):
        self.cfg = cfg
        self.mesh = mesh
        self.rules = rules
        pd = _dtype(cfg.param_dtype)
        self.embed = _kernel(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, rngs, i, mesh, rules) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _kernel(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    # ---- pieces shared by training losses ------------------------------------------------
    def logits_from_hidden(self, hidden):
        """fp32 logits from final hidden states ``[..., D]`` (fp32 operands for sampler/trainer parity)."""
        h = hidden.astype(jnp.float32)
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", h, self.embed[...].astype(jnp.float32))
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(jnp.float32))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache: KVCache | None = None, return_hidden: bool = False, use_lora: bool = True):
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask).astype(bool)
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
            seg_valid = segment_ids > 0
            attention_mask = seg_valid if attention_mask is None else attention_mask & seg_valid

        # use_lora=False runs the frozen base weights: GRPO's reference policy without a second copy.
        ctx = {"segment_ids": segment_ids}
        if cache is None or t > 1:
            if positions is None:
                if attention_mask is not None:
                    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
                else:
                    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            ctx["q_slot"] = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            ctx["kv_valid"] = attention_mask  # None = no padding (lets fused kernels skip the mask)
        else:
            if positions is None:
                raise ValueError("decode steps with a cache need explicit positions [B, 1]")
            index = cache.index
            step_valid = jnp.ones((b, 1), bool) if attention_mask is None else attention_mask
            ctx["cache_index"] = index
            ctx["q_slot"] = jnp.broadcast_to(index, (b, 1)).astype(jnp.int32)
            ctx["kv_valid"] = jax.lax.dynamic_update_slice_in_dim(cache.valid, step_valid, index, axis=1)
        positions = jnp.asarray(positions, jnp.int32)

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        x = shard(x, ("batch", "length", "act_embed"), self.mesh, self.rules)
        cos, sin = rotary_embedding(positions, cfg.head_dim, cfg.rope_theta)

        cache_kv = None if cache is None else (cache.k, cache.v)
        for layer in self.layers:
            if cfg.remat != "none" and cache is None:
                # Pure jax.checkpoint over the layer's (graphdef, state): NNX objects never cross
                # the remat trace boundary, which keeps LoRA and frozen params legal to read.
                layer_def, layer_state = nnx.split(layer)

                def pure(state, x, cos, sin, ctx, layer_def=layer_def):
                    return _run_layer(nnx.merge(layer_def, state), x, cos, sin, ctx, None, use_lora)

                x, cache_kv = jax.checkpoint(pure, policy=_REMAT_POLICIES[cfg.remat])(layer_state, x, cos, sin, ctx)
            else:
                x, cache_kv = _run_layer(layer, x, cos, sin, ctx, cache_kv, use_lora)
        hidden = self.final_norm(x)
        out = hidden if return_hidden else shard(
            self.logits_from_hidden(hidden), ("batch", "length", "act_vocab"), self.mesh, self.rules
        )
        if cache is None:
            return out
        if t > 1:
            valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
            new_valid = cache.valid.at[:, :t].set(valid)
        else:
            new_valid = ctx["kv_valid"]
        new_cache = KVCache(k=cache_kv[0], v=cache_kv[1], valid=new_valid, index=cache.index + t)
        return out, new_cache
