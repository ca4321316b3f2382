"""Grouped-query attention kernels, selected by ``ModelConfig.attention_impl``.

All implementations take the same arguments and never repeat KV heads in memory: queries
are viewed as ``[B, T, K, G, H]`` (K kv heads, G query heads per kv head).

Masking is expressed with slot indices rather than a materialised ``[T, S]`` mask so the
chunked kernel can build each block's mask on the fly:
  key j is visible to query i  iff  kv_slot[j] <= q_slot[i]  (causal)
                               and  kv_valid[b, j]          (padding / unwritten cache)
                               and  q_seg[b, i] == kv_seg[b, j]  (packing)
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# A large finite negative: fully-masked rows (left padding) stay finite instead of NaN,
# and an online softmax that first sees only masked keys recovers once a real key arrives.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _visible(q_slot, kv_slot, kv_valid, q_seg, kv_seg):
    """Boolean mask ``[B, 1, 1, T, S]`` (broadcast over kv heads and group)."""
    # q_slot [B, T], kv_slot [S], kv_valid [B, S], q_seg [B, T] | None, kv_seg [B, S] | None
    mask = kv_slot[None, None, :] <= q_slot[:, :, None]
    mask = mask & kv_valid[:, None, :]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask[:, None, None, :, :]


def reference_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None):
    """Plain einsum attention with an fp32 softmax: the parity oracle.

    q [B, T, N, H]; k, v [B, S, K, H]; returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    mask = _visible(q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def chunked_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None, block_size=512):
    """Blockwise attention over key/value blocks with an online softmax (pure JAX).

    Peak memory grows with ``T * block_size`` instead of ``T * S``; works on every backend.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    block = min(block_size, s)
    num_blocks = -(-s // block)
    pad = num_blocks * block - s
    if pad:
        # Padded keys are invalid, so they never receive weight.
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad)))
        kv_slot = jnp.pad(kv_slot, (0, pad), constant_values=jnp.iinfo(jnp.int32).max)
        if kv_seg is not None:
            kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    qg = (q.reshape(b, t, kv_heads, g, h).astype(jnp.float32) * (h ** -0.5)).astype(q.dtype)

    # Blocks become the leading (scanned) axis.
    k_blocks = k.reshape(b, num_blocks, block, kv_heads, h).swapaxes(0, 1)
    v_blocks = v.reshape(b, num_blocks, block, kv_heads, h).swapaxes(0, 1)
    valid_blocks = kv_valid.reshape(b, num_blocks, block).swapaxes(0, 1)
    slot_blocks = kv_slot.reshape(num_blocks, block)
    seg_blocks = None if kv_seg is None else kv_seg.reshape(b, num_blocks, block).swapaxes(0, 1)

    def step(carry, xs):
        acc, row_max, row_sum = carry  # [B,K,G,T,H], [B,K,G,T], [B,K,G,T]
        kb, vb, valid_b, slot_b, seg_b = xs
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, kb, preferred_element_type=jnp.float32)
        mask = _visible(q_slot, slot_b, valid_b, q_seg, seg_b)
        scores = jnp.where(mask, scores, MASK_VALUE)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        row_sum = row_sum * correction + probs.sum(axis=-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", probs.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + pv
        return (acc, new_max, row_sum), None

    init = (
        jnp.zeros((b, kv_heads, g, t, h), jnp.float32),
        jnp.full((b, kv_heads, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv_heads, g, t), jnp.float32),
    )
    xs = (k_blocks, v_blocks, valid_blocks, slot_blocks, seg_blocks)
    if seg_blocks is None:
        xs = (k_blocks, v_blocks, valid_blocks, slot_blocks, jnp.zeros((num_blocks,), jnp.int32))

        def step_noseg(carry, x):
            kb, vb, valid_b, slot_b, _ = x
            return step(carry, (kb, vb, valid_b, slot_b, None))

        (acc, _, row_sum), _ = jax.lax.scan(step_noseg, init, xs)
    else:
        (acc, _, row_sum), _ = jax.lax.scan(step, init, xs)
    out = acc / row_sum[..., None]  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def cudnn_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None):
    """NVIDIA cuDNN fused attention via ``jax.nn.dot_product_attention``.

    Used for causal self-attention over a full sequence (training, prefill) where query slot
    i sits at key slot i; padding and packing are folded into a boolean mask.
    """
    t, s = q.shape[1], k.shape[1]
    if t != s:
        raise ValueError("cudnn attention serves full-sequence (prefill/training) calls; decode uses chunked")
    # Left padding cannot be expressed by sequence lengths alone, so padding (and packing)
    # travel as a boolean mask next to the causal flag; with neither, no mask is built at all
    # (a [T, S] mask at 24k tokens would cost more memory than the kernel saves).
    mask = None
    if kv_valid is not None or q_seg is not None:
        b = q.shape[0]
        valid = jnp.ones((b, s), bool) if kv_valid is None else kv_valid
        mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, t, s))
        if q_seg is not None:
            mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def splash_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None):
    """TPU Pallas splash attention (causal; segment ids carry padding and packing).

    GQA without repeating KV: the MQA kernel runs once per kv head over that head's G query
    heads (vmapped over batch and kv heads). Padding becomes segment id 0, so padded rows
    attend only among themselves and their outputs are ignored downstream.
    Not exercised by CI (no TPU there); on other platforms ``resolve_impl`` picks ``chunked``.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    if q_seg is None:
        q_seg = jnp.ones((b, t), jnp.int32)
        kv_seg = jnp.ones((b, k.shape[1]), jnp.int32)
    if kv_valid is not None:
        kv_seg = jnp.where(kv_valid, kv_seg, 0)
        q_seg = jnp.where(kv_valid, q_seg, 0)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(g)])
    kernel = sk.make_splash_mqa_single_device(mask)
    qt = (q * (h ** -0.5)).reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    vt = v.transpose(0, 2, 1, 3)

    def one(qb, kb, vb, qs, ks):
        seg = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=seg))(qb, kb, vb)

    out = jax.vmap(one)(qt, kt, vt, q_seg, kv_seg)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def resolve_impl(impl: str, is_decode: bool) -> str:
    """Pick a concrete kernel; fused kernels fall back to ``chunked`` where unavailable."""
    platform = jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "chunked")
    if impl == "cudnn" and (platform != "gpu" or is_decode):
        return "chunked"
    if impl == "splash" and (platform != "tpu" or is_decode):
        return "chunked"
    return impl


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str):
    if requested not in (chosen, "auto"):
        log.info("attention %s is unavailable here; using %s", requested, chosen)


def attend(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None, *, impl="auto", block_size=512, is_decode=False):
    chosen = resolve_impl(impl, is_decode)
    _log_choice(impl, chosen)
    if kv_valid is None and chosen != "cudnn":
        kv_valid = jnp.ones((k.shape[0], k.shape[1]), bool)
    if chosen == "reference":
        return reference_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    if chosen == "chunked":
        return chunked_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg, block_size=block_size)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    if chosen == "splash":
        return splash_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    raise ValueError(f"unknown attention implementation {chosen!r}")
