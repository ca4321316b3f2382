"""Blockwise attention that also returns its log-sum-exp, with a memory-lean backward (pure JAX).

``attention_with_lse`` is what a *partial* attention needs: the shared-prefix policy update
(``models/prefix_attention.py``) attends once over a prompt's keys and once over a rollout's own
keys and merges the two by their log-sum-exps, so the LSE must be an output and differentiable.

Forward: an online softmax over key blocks inside a loop over query blocks (FlashAttention's
schedule, written with ``lax.scan``). Backward (``custom_vjp``): only q, k, v, the output and the
LSE are saved; each (query block, key block) tile's probabilities are recomputed from the LSE, so
neither pass ever holds more than one ``[q_block, kv_block]`` tile of scores per head. Autodiff
through a plain scan would instead save every tile (the whole ``[T, S]`` matrix).

With ``o = sum_j p_j v_j``, ``p_j = exp(s_j - lse)``: ``ds_j = p_j (dO.v_j - dO.o + dlse)``.
Masking follows ``attention.py`` (slot indices, finite ``MASK_VALUE``): a query with no visible
key gets a uniform average and an LSE near ``MASK_VALUE``, which a merge weighs as zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grouprank_jax.models.attention import MASK_VALUE


def _pad_to(x, axis: int, multiple: int, value=0):
    size = x.shape[axis]
    pad = -(-size // multiple) * multiple - size
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _tile_mask(q_slot, kv_slot, kv_valid):
    # q_slot [B, tq], kv_slot [tk], kv_valid [B, tk] -> [B, 1, 1, tq, tk]
    mask = (kv_slot[None, None, :] <= q_slot[:, :, None]) & kv_valid[:, None, :]
    return mask[:, None, None]


def _blocked(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block):
    """Pad T and S to their block sizes and move blocks to the leading axis."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    tq, tk = min(q_block, t), min(kv_block, k.shape[1])
    q = _pad_to(q, 1, tq).reshape(b, -1, tq, kv_heads, n // kv_heads, h).swapaxes(0, 1)  # [nq, B, tq, K, Gq, H]
    q_slot = _pad_to(q_slot, 1, tq).reshape(b, -1, tq).swapaxes(0, 1)  # [nq, B, tq]
    k = _pad_to(k, 1, tk).reshape(b, -1, tk, kv_heads, h).swapaxes(0, 1)  # [nk, B, tk, K, H]
    v = _pad_to(v, 1, tk).reshape(b, -1, tk, kv_heads, h).swapaxes(0, 1)
    # padded keys are invalid and sit after every query slot
    kv_slot = _pad_to(kv_slot, 0, tk, jnp.iinfo(jnp.int32).max).reshape(-1, tk)  # [nk, tk]
    kv_valid = _pad_to(kv_valid, 1, tk, False).reshape(b, -1, tk).swapaxes(0, 1)  # [nk, B, tk]
    return q, k, v, q_slot, kv_slot, kv_valid


def _forward(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block):
    b, t, n, h = q.shape
    scale = h**-0.5
    qb, kb, vb, qs, ks, kvv = _blocked(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block)

    def one_query_block(args):
        q_tile, q_slot_tile = args  # [B, tq, K, Gq, H], [B, tq]
        tq = q_tile.shape[1]
        kv_heads, gq = q_tile.shape[2], q_tile.shape[3]

        def step(carry, xs):
            acc, row_max, row_sum = carry  # [B, K, Gq, tq, H], [B, K, Gq, tq] x2
            k_tile, v_tile, slot_tile, valid_tile = xs
            s = jnp.einsum("btkgh,bskh->bkgts", q_tile, k_tile, preferred_element_type=jnp.float32) * scale
            s = jnp.where(_tile_mask(q_slot_tile, slot_tile, valid_tile), s, MASK_VALUE)
            new_max = jnp.maximum(row_max, s.max(axis=-1))
            correction = jnp.exp(row_max - new_max)
            p = jnp.exp(s - new_max[..., None])
            row_sum = row_sum * correction + p.sum(axis=-1)
            pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32)
            return (acc * correction[..., None] + pv, new_max, row_sum), None

        init = (
            jnp.zeros((b, kv_heads, gq, tq, h), jnp.float32),
            jnp.full((b, kv_heads, gq, tq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kv_heads, gq, tq), jnp.float32),
        )
        (acc, row_max, row_sum), _ = jax.lax.scan(step, init, (kb, vb, ks, kvv))
        out = acc / row_sum[..., None]  # [B, K, Gq, tq, H]
        lse = row_max + jnp.log(row_sum)  # [B, K, Gq, tq]
        return out.transpose(0, 3, 1, 2, 4), lse.transpose(0, 3, 1, 2)  # [B, tq, K, Gq, H], [B, tq, K, Gq]

    out, lse = jax.lax.map(one_query_block, (qb, qs))  # [nq, B, tq, K, Gq, H], [nq, B, tq, K, Gq]
    out = out.swapaxes(0, 1).reshape(b, -1, n, h)[:, :t]
    lse = lse.swapaxes(0, 1).reshape(b, -1, n)[:, :t]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def attention_with_lse(q, k, v, q_slot, kv_slot, kv_valid, q_block: int = 512, kv_block: int = 512):
    """Softmax attention and its log-sum-exp.

    q [B, T, N, H]; k, v [B, S, K, H] (GQA: N = K * Gq, KV heads never repeated); q_slot [B, T],
    kv_slot [S] int32, kv_valid [B, S] bool: key j is visible to query i iff
    ``kv_slot[j] <= q_slot[i] and kv_valid[b, j]``. Returns ``out [B, T, N, H]`` and
    ``lse [B, T, N]``, both fp32 (the caller merges parts in fp32, then casts).
    """
    return _forward(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block)


def _fwd(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block):
    out, lse = _forward(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block)
    return (out, lse), (q, k, v, q_slot, kv_slot, kv_valid, out, lse)


def _bwd(q_block, kv_block, residuals, cotangents):
    q, k, v, q_slot, kv_slot, kv_valid, out, lse = residuals
    d_out, d_lse = cotangents  # [B, T, N, H], [B, T, N]
    b, t, n, h = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    gq = n // kv_heads
    scale = h**-0.5
    d_out = d_out.astype(jnp.float32)
    # delta_i = dO_i . o_i - dlse_i: the softmax-Jacobian's row term
    delta = jnp.sum(d_out * out, axis=-1) - d_lse.astype(jnp.float32)  # [B, T, N]
    qb, kb, vb, qs, ks, kvv = _blocked(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block)
    tq = qb.shape[2]
    nk, tk = kb.shape[0], kb.shape[2]

    def rows(x):  # [B, T, N, ...] -> [nq, B, tq, K, Gq, ...]
        x = _pad_to(x, 1, tq)
        return x.reshape(b, -1, tq, kv_heads, gq, *x.shape[3:]).swapaxes(0, 1)

    per_q = (qb, qs, rows(d_out), rows(lse), rows(delta))

    def one_query_block(carry, xs):
        dk_acc, dv_acc = carry  # [nk, B, tk, K, H] fp32
        q_tile, q_slot_tile, do_tile, lse_tile, delta_tile = xs
        lse_t = lse_tile.transpose(0, 2, 3, 1)[..., None]  # [B, K, Gq, tq, 1]
        delta_t = delta_tile.transpose(0, 2, 3, 1)[..., None]

        def one_key_block(dq, ys):
            k_tile, v_tile, slot_tile, valid_tile = ys
            s = jnp.einsum("btkgh,bskh->bkgts", q_tile, k_tile, preferred_element_type=jnp.float32) * scale
            visible = _tile_mask(q_slot_tile, slot_tile, valid_tile)
            p = jnp.exp(jnp.where(visible, s, MASK_VALUE) - lse_t)  # [B, K, Gq, tq, tk]
            dp = jnp.einsum("btkgh,bskh->bkgts", do_tile, v_tile, preferred_element_type=jnp.float32)
            ds = jnp.where(visible, p * (dp - delta_t), 0.0) * scale  # a masked score is a constant
            dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, k_tile, preferred_element_type=jnp.float32)
            dk = jnp.einsum("bkgts,btkgh->bskh", ds, q_tile, preferred_element_type=jnp.float32)
            dv = jnp.einsum("bkgts,btkgh->bskh", p, do_tile, preferred_element_type=jnp.float32)
            return dq, (dk, dv)

        dq0 = jnp.zeros(q_tile.shape, jnp.float32)
        dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, (kb, vb, ks, kvv))
        return (dk_acc + dk, dv_acc + dv), dq

    zeros = jnp.zeros((nk, b, tk, kv_heads, h), jnp.float32)
    (dk, dv), dq = jax.lax.scan(one_query_block, (zeros, zeros), per_q)
    dq = dq.swapaxes(0, 1).reshape(b, -1, n, h)[:, :t].astype(q.dtype)
    dk = dk.swapaxes(0, 1).reshape(b, -1, kv_heads, h)[:, :s_len].astype(k.dtype)
    dv = dv.swapaxes(0, 1).reshape(b, -1, kv_heads, h)[:, :s_len].astype(v.dtype)
    return dq, dk, dv, None, None, None


attention_with_lse.defvjp(_fwd, _bwd)


def merge_attention_parts(out_a, lse_a, out_b, lse_b):
    """Softmax attention over keys ``A ∪ B`` from the attentions over A and over B.

    out_* [..., N, H] fp32, lse_* [..., N]: ``(wa*out_a + wb*out_b) / (wa + wb)`` with
    ``w = exp(lse - max(lse_a, lse_b))``; an empty part (lse near MASK_VALUE) weighs zero.
    """
    m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))  # the result does not depend on m
    wa, wb = jnp.exp(lse_a - m)[..., None], jnp.exp(lse_b - m)[..., None]
    return (wa * out_a + wb * out_b) / (wa + wb)
