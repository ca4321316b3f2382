"""Pure sampling ops on fp32 logits: temperature, top-k, top-p, categorical draws, log-probs.

``greedy``, ``top_k`` and ``use_top_p`` are static (they change the program); temperature and
the top-p mass are traced, so switching 0.3 -> 1.0 or 0.8 -> 0.95 never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _candidates(scaled, top_k: int, use_top_p: bool):
    """Sorted candidate logits and their ids ``[B, C]``; C = top_k, or the whole vocab for top-p."""
    vocab = scaled.shape[-1]
    k = min(top_k, vocab) if top_k > 0 else vocab
    # lax.top_k returns descending values; with k == vocab it is a full sort, which top-p needs.
    return jax.lax.top_k(scaled, k)


def _nucleus_mask(sorted_logits, top_p):
    """Keep the smallest prefix of the sorted candidates whose mass reaches ``top_p``.

    A candidate is kept when the mass strictly before it is < top_p, so the top token is always kept.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, C]
    before = jnp.cumsum(probs, axis=-1) - probs
    return before < top_p


def filtered_logits(logits, temperature, top_p, *, top_k: int, use_top_p: bool):
    """``(values [B, C], ids [B, C] | None)``: the distribution a draw samples from.

    Filtered-out candidates hold ``-inf``. ``ids`` is None when nothing is filtered (C = vocab in
    token order); otherwise ``values[b, c]`` is the scaled logit of token ``ids[b, c]``.
    """
    scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k <= 0 and not use_top_p:
        return scaled, None
    values, ids = _candidates(scaled, top_k, use_top_p)
    if use_top_p:
        values = jnp.where(_nucleus_mask(values, top_p), values, -jnp.inf)
    return values, ids


def categorical(keys, values, block: int = 128):
    """One draw per row from ``softmax(values [B, C])`` (``-inf`` = excluded), ``keys [B]``.

    Two-level inverse-CDF sampling: pick a block of ``block`` candidates with probability equal to
    its mass, then a candidate inside it, each with one uniform. Exact up to fp32 rounding of the
    cumulative sums, and it needs 2 random numbers per row where ``jax.random.categorical``'s
    Gumbel-max needs C: at the 152k Qwen vocabulary that was ~200 ms of threefry per decode step
    for 64 rows on two CPU cores (this: ~20 ms; the LM head matmul itself: ~22 ms). The same idea as
    FlashInfer's inverse-transform sampling kernels. Never picks a zero-probability entry:
    rounding that would land past the last candidate is clamped to the last one with mass.
    """
    rows, width = values.shape
    block = max(1, min(block, width))
    pad = (-width) % block
    probs = jnp.exp(values - jnp.max(values, axis=-1, keepdims=True))  # [B, C]; exp(-inf) = 0
    if pad:
        probs = jnp.pad(probs, ((0, 0), (0, pad)))
    blocks = probs.reshape(rows, -1, block)  # [B, nb, block]
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)  # [B, 2]

    def first_above(weights, u):  # [B, n], [B] -> [B]: inverse CDF, clamped to the last index with mass
        cdf = jnp.cumsum(weights, axis=-1)
        idx = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
        last = weights.shape[-1] - 1 - jnp.argmax((weights > 0)[:, ::-1], axis=-1)
        return jnp.minimum(idx, last)

    block_idx = first_above(blocks.sum(-1), uniforms[:, 0])  # [B]
    chosen = jnp.take_along_axis(blocks, block_idx[:, None, None], axis=1)[:, 0]  # [B, block]
    return block_idx * block + first_above(chosen, uniforms[:, 1])


def sample_tokens(logits, keys, temperature, top_p, *, greedy: bool, top_k: int = 0, use_top_p: bool = False):
    """One token per row: ``logits [B, V]`` fp32, ``keys [B]`` typed PRNG keys -> ``[B]`` int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    values, ids = filtered_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    # Per-row keys (not one key for the batch) so a row's draw does not depend on the batch size.
    choice = categorical(keys, values)  # [B]
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def token_logprobs(logits, tokens):
    """The policy's own log-prob of ``tokens [B]`` under ``logits [B, V]`` at temperature 1.

    Deliberately not the temperature-scaled / filtered distribution: GRPO's importance ratio
    compares against the trainer's plain log-softmax of the same fp32 logits.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def row_keys(base_key, rows, step):
    """``[B]`` keys: the output row index and the step folded into the call's key."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base_key, r), step))(rows)


def match_stop_sequences(recent, stop_seqs):
    """``[B]`` bool: the last tokens of a row equal one of the stop sequences.

    recent [B, W] holds each row's last W generated tokens (oldest first); stop_seqs [S, W] are
    right-aligned token sequences left-padded with -1 (a wildcard: shorter sequences).
    """
    if stop_seqs.shape[0] == 0:
        return jnp.zeros(recent.shape[:1], bool)
    hit = (recent[:, None, :] == stop_seqs[None]) | (stop_seqs[None] < 0)  # [B, S, W]
    return jnp.any(jnp.all(hit, axis=-1), axis=-1)
