"""The Qwen2 / Qwen2.5 decoder in Flax NNX.

Computes what HF transformers' ``Qwen2ForCausalLM`` computes: RMSNorm with fp32 statistics,
half-split RoPE with fp32 angles, grouped-query attention (q/k/v bias, no o bias) that never
repeats KV heads, a SwiGLU MLP and a tied or untied LM head. Every linear map is a
``Projection`` (models/projection.py) whose einsum string documents the layout
(``btd,dnh->btnh``) and which carries the optional LoRA adapter. Every parameter carries logical
axis names that ``parallel/mesh.py``'s one rules table maps to the mesh; model code never names
a device axis, and the mesh comes from context (``use_mesh``), entered by the model's root with
the mesh it was placed on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.attention import attend, mesh_platform, shared_prefix_decode_attention
from grouprank_jax.models.kv_cache import KVCache, PrefixKV
from grouprank_jax.models.prefix_attention import prefix_attention_fused, shared_prefix_attention
from grouprank_jax.models.projection import Projection, normal_param, tied_head_logits
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, Rules, shard, use_mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What a layer's attention needs besides q/k/v, for one call (prefill/training or decode)."""

    q_slot: jax.Array  # [B, T] int32: cache slot (= position in the padded row) of each query
    kv_valid: jax.Array | None  # [B, S] bool: the key slot holds a real token; None = all valid
    segment_ids: jax.Array | None  # [B, T] int32 packing segments (0 = padding); None = unpacked
    cache_index: jax.Array | None = None  # [] int32: the slot a decode step writes; None = full sequence
    # Shared prompt KV (rows = prompts x rollouts, prompt-major) that a decode step, or a whole
    # response (the shared-prefix policy update), attends to besides its own keys.
    prefix: PrefixKV | None = None


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

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


def _projection(
    cfg: ModelConfig, rngs: nnx.Rngs, name: str, equation: str, shape, axes, in_dims: int, bias: bool = False
) -> Projection:
    rank = cfg.lora_rank if name in cfg.lora_targets else 0
    return Projection(
        equation,
        shape,
        axes,
        in_dims=in_dims,
        param_dtype=jnp.dtype(cfg.param_dtype),
        std=cfg.initializer_range,
        rngs=rngs,
        bias=bias,
        lora_rank=rank,
        lora_alpha=cfg.lora_alpha,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_index: int):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.layer_index = cfg, layer_index
        self.q_proj = _projection(
            cfg, rngs, "q_proj", "btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), 1, True
        )
        self.k_proj = _projection(
            cfg, rngs, "k_proj", "btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), 1, True
        )
        self.v_proj = _projection(
            cfg, rngs, "v_proj", "btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), 1, True
        )
        self.o_proj = _projection(cfg, rngs, "o_proj", "btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), 2)

    def __call__(self, x, cos, sin, inputs: AttentionInputs, cache_kv, use_lora: bool, collect_kv: bool = False):
        cfg, dt = self.cfg, x.dtype
        q = shard(apply_rotary(self.q_proj(x, use_lora), cos, sin), ("batch", "length", "act_heads", "head_dim"))
        k = shard(apply_rotary(self.k_proj(x, use_lora), cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
        v = shard(self.v_proj(x, use_lora), ("batch", "length", "act_kv_heads", "head_dim"))
        kernel = dict(
            impl=cfg.attention_impl,
            block_size=cfg.attention_block_size,
            splash_block_size=cfg.splash_block_size,
            splash_interpret=cfg.splash_interpret,
        )
        decode = inputs.cache_index is not None
        if not decode and inputs.prefix is not None:
            # A whole response over its prompt's shared KV plus its own causal keys.
            prefix = inputs.prefix
            out = shared_prefix_attention(
                q,
                k,
                v,
                prefix.k[self.layer_index].swapaxes(1, 2).astype(dt),  # [B, K, P, H] -> [B, P, K, H]
                prefix.v[self.layer_index].swapaxes(1, 2).astype(dt),
                prefix.valid,
                inputs.kv_valid,
                cfg.attention_block_size,
                cfg.attention_block_size,
                fused=prefix_attention_fused(cfg.attention_impl),
            )
        elif not decode:
            # Full-sequence attention (training, scoring, prefill).
            out = attend(
                q,
                k,
                v,
                inputs.q_slot,
                inputs.q_slot[0],
                inputs.kv_valid,
                inputs.segment_ids,
                inputs.segment_ids,
                **kernel,
            )
        if cache_kv is not None:
            # In-place write of this layer's new keys/values into its donated buffers.
            layer_k, layer_v = cache_kv  # [B, K, slots, H] each
            at = (0, 0, inputs.cache_index if decode else 0, 0)
            layer_k = jax.lax.dynamic_update_slice(layer_k, k.swapaxes(1, 2).astype(layer_k.dtype), at)
            layer_v = jax.lax.dynamic_update_slice(layer_v, v.swapaxes(1, 2).astype(layer_v.dtype), at)
            cache_kv = (layer_k, layer_v)
            if decode and inputs.prefix is not None:
                prefix = inputs.prefix
                out = shared_prefix_decode_attention(
                    q,
                    prefix.k[self.layer_index].astype(dt),
                    prefix.v[self.layer_index].astype(dt),
                    prefix.valid,
                    layer_k.astype(dt),
                    layer_v.astype(dt),
                    inputs.kv_valid,
                )
            elif decode:
                # The per-row oracle layout goes through the generic kernel, slots before heads.
                slots = jnp.arange(layer_k.shape[2], dtype=jnp.int32)
                out = attend(
                    q,
                    layer_k.swapaxes(1, 2).astype(dt),
                    layer_v.swapaxes(1, 2).astype(dt),
                    inputs.q_slot,
                    slots,
                    inputs.kv_valid,
                    is_decode=True,
                    **kernel,
                )
        if collect_kv:
            # A prompt's keys/values for the responses that share it (with gradient), [B, K, T, H]
            # as in a PrefixKV.
            cache_kv = (k.swapaxes(1, 2), v.swapaxes(1, 2))
        return self.o_proj(out, use_lora), cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _projection(cfg, rngs, "gate_proj", "btd,df->btf", (d, f), ("embed", "mlp"), 1)
        self.up_proj = _projection(cfg, rngs, "up_proj", "btd,df->btf", (d, f), ("embed", "mlp"), 1)
        self.down_proj = _projection(cfg, rngs, "down_proj", "btf,fd->btd", (f, d), ("mlp", "embed"), 1)

    def __call__(self, x, use_lora: bool):
        hidden = jax.nn.silu(self.gate_proj(x, use_lora)) * self.up_proj(x, use_lora)
        return self.down_proj(shard(hidden, ("batch", "length", "act_mlp")), use_lora)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_index: int):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.attn = Attention(cfg, rngs, layer_index)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, inputs: AttentionInputs, cache_kv, use_lora: bool = True, collect_kv: bool = False):
        attn_out, cache_kv = self.attn(self.input_norm(x), cos, sin, inputs, cache_kv, use_lora, collect_kv)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), use_lora)
        return shard(x, ("batch", "length", "act_embed")), cache_kv


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Qwen2ForCausalLM(nnx.Module):
    """``model(input_ids, attention_mask=...)`` -> fp32 logits ``[B, T, vocab]``.

    Optional: ``positions`` [B, T] (default: derived from the mask as HF generation does,
    ``cumsum(mask) - 1``), ``segment_ids`` [B, T] for packed rows (0 = padding), ``cache`` (a
    ``KVCache``; then ``(logits, cache)`` is returned), ``prefix`` (a ``PrefixKV`` shared by the
    rows of a decode step: rows are prompt-major, G = rows / prompts rollouts per prompt, and the
    cache then holds only each row's generated suffix), ``return_hidden`` (final normed hidden
    states instead of logits, for losses that apply the LM head blockwise), ``use_lora`` (False
    runs the base weights only, i.e. the reference policy of a LoRA run).

    The shared-prefix policy update uses two more modes: ``collect_kv=True`` (a prompt forward:
    also returns the ``PrefixKV`` of every layer, differentiable) and ``prefix`` without a cache
    (a response forward: rows = prompts x rollouts, each response attends to its prompt's
    ``prefix`` and causally to itself; ``positions`` must continue the prompt's).

    ``mesh`` is the mesh the parameters live on (``models.build`` places them); a call runs under
    ``use_mesh(mesh)`` so every activation constraint below refers to it.
    """

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None, rules: Rules = LOGICAL_AXIS_RULES
    ):
        self.cfg = cfg
        self.mesh = mesh
        self.rules = rules
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = normal_param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, cfg.initializer_range
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs, i) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = normal_param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, cfg.initializer_range
            )

    # ---- pieces shared by training losses ------------------------------------------------
    def logits_from_hidden(self, hidden):
        """fp32 logits from final hidden states ``[..., D]`` (fp32 operands for sampler/trainer parity)."""
        if self.cfg.tie_word_embeddings:
            return tied_head_logits(hidden, self.embed[...], mesh_platform(self.mesh))
        h = hidden.astype(jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(jnp.float32))

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        segment_ids=None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        use_lora: bool = True,
        prefix: PrefixKV | None = None,
        collect_kv: bool = False,
    ):
        with use_mesh(self.mesh, self.rules):
            return self._forward(
                input_ids, attention_mask, positions, segment_ids, cache, return_hidden, use_lora, prefix, collect_kv
            )

    def _forward(
        self, input_ids, attention_mask, positions, segment_ids, cache, return_hidden, use_lora, prefix, collect_kv
    ):
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask).astype(bool)
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
            seg_valid = segment_ids > 0
            attention_mask = seg_valid if attention_mask is None else attention_mask & seg_valid

        if prefix is not None and cache is not None and t != 1:
            raise ValueError("prefix= with a cache is for decode steps (one token per row)")
        if collect_kv and (cache is not None or prefix is not None):
            raise ValueError("collect_kv= is for a prompt forward (no cache, no prefix)")
        if prefix is not None and cache is None:
            if positions is None or attention_mask is None:
                raise ValueError("a response forward over a prefix needs its positions and mask [R, C]")
            inputs = AttentionInputs(
                jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), attention_mask, None, prefix=prefix
            )
        elif cache is None or t > 1:
            if positions is None:
                if attention_mask is not None:
                    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
                else:
                    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            # kv_valid None = no padding (lets fused kernels skip the mask)
            inputs = AttentionInputs(
                jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), attention_mask, segment_ids
            )
        else:
            if positions is None:
                raise ValueError("decode steps with a cache need explicit positions [B, 1]")
            step_valid = jnp.ones((b, 1), bool) if attention_mask is None else attention_mask
            inputs = AttentionInputs(
                q_slot=jnp.broadcast_to(cache.index, (b, 1)).astype(jnp.int32),
                kv_valid=jax.lax.dynamic_update_slice_in_dim(cache.valid, step_valid, cache.index, axis=1),
                segment_ids=None,
                cache_index=cache.index,
                prefix=prefix,
            )
        positions = jnp.asarray(positions, jnp.int32)

        x = shard(jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.dtype), ("batch", "length", "act_embed"))
        cos, sin = rotary_embedding(positions, cfg.head_dim, cfg.rope_theta)

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            if cfg.remat != "none" and cache is None:
                # Pure jax.checkpoint over the layer's (graphdef, state): NNX objects never cross
                # the remat trace boundary, which keeps LoRA and frozen params legal to read.
                layer_def, layer_state = nnx.split(layer)

                def pure(state, x, cos, sin, inputs, layer_def=layer_def):
                    return nnx.merge(layer_def, state)(x, cos, sin, inputs, None, use_lora, collect_kv)

                x, cache_kv = jax.checkpoint(pure, policy=_REMAT_POLICIES[cfg.remat])(layer_state, x, cos, sin, inputs)
            else:
                x, cache_kv = layer(x, cos, sin, inputs, cache_kv, use_lora, collect_kv)
            if cache is not None or collect_kv:
                new_k.append(cache_kv[0])
                new_v.append(cache_kv[1])
        hidden = self.final_norm(x)
        out = hidden if return_hidden else shard(self.logits_from_hidden(hidden), ("batch", "length", "act_vocab"))
        if collect_kv:
            valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
            return out, PrefixKV(k=tuple(new_k), v=tuple(new_v), valid=valid)
        if cache is None:
            return out
        if t > 1:
            valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
            new_valid = cache.valid.at[:, :t].set(valid)
        else:
            new_valid = inputs.kv_valid
        return out, KVCache(k=tuple(new_k), v=tuple(new_v), valid=new_valid, index=cache.index + t)
