"""Pure sampling ops on fp32 logits: temperature, top-k, top-p, categorical draws, log-probs.

``greedy``, ``top_k`` and ``use_top_p`` are static (they change the program); temperature and
the top-p mass are traced, so switching 0.3 -> 1.0 or 0.8 -> 0.95 never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Top-p without top-k first sorts only this many candidates; the exact full-vocabulary search runs
# only for rows whose nucleus is wider (a flat distribution). A full sort of the 152k Qwen vocabulary
# was ~360 ms per decode step for 8 rows on two CPU cores; this window costs ~3 ms.
NUCLEUS_WINDOW = 256


def _nucleus_mask(sorted_logits, top_p):
    """Keep the smallest prefix of the sorted candidates whose mass reaches ``top_p``.

    A candidate is kept when the mass strictly before it is < top_p, so the top token is always kept.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, C]
    before = jnp.cumsum(probs, axis=-1) - probs
    return before < top_p


def nucleus_keep(scaled, top_p):
    """``[B, V]`` bool: the top-p set of ``softmax(scaled)`` in token order, without a sort.

    The same rule as ``_nucleus_mask`` on the sorted vocabulary (rank by probability, equal
    probabilities by lower token id; keep a token when the mass ranked strictly before it is
    < top_p). The threshold probability p* is the smallest probability whose strictly-larger mass is
    < top_p; it is found by bisection on the int32 bit pattern of non-negative fp32 values (monotone
    in the value), one masked sum over the vocabulary per halving (at most 31). Of the tokens equal
    to p*, the first ones in token order are kept while the running mass stays < top_p.
    """
    probs = jax.nn.softmax(scaled, axis=-1)  # [B, V]
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [B, V]
    top_p = jnp.asarray(top_p, jnp.float32)

    def mass_above(threshold):  # [B] bit patterns -> [B] mass of the tokens strictly above
        return jnp.sum(jnp.where(bits > threshold[:, None], probs, 0.0), axis=-1)

    def halve(bounds):  # invariant: mass_above(hi) < top_p <= mass_above(lo), or lo < every probability
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    # The answer lies in (min - 1, max]: nothing lies above the largest probability (mass 0 < top_p).
    # A flat distribution spans few binades, so the search needs fewer halvings (~23 within one).
    lo = jnp.min(bits, axis=-1) - 1
    hi = jnp.max(bits, axis=-1)
    _, threshold = jax.lax.while_loop(lambda b: jnp.any(b[1] - b[0] > 1), halve, (lo, hi))
    above = bits > threshold[:, None]
    ties = bits == threshold[:, None]
    base = mass_above(threshold)[:, None]

    def ranked_ties():  # several tokens share p*: keep them in token order while the mass stays < top_p
        tie_probs = jnp.where(ties, probs, 0.0)
        return ties & (base + jnp.cumsum(tie_probs, axis=-1) - tie_probs < top_p)

    # One token at p* (the usual case) is kept: the mass above it is < top_p by construction.
    boundary = jax.lax.cond(jnp.any(jnp.sum(ties, axis=-1) > 1), ranked_ties, lambda: ties)
    return above | boundary


def _top_k_filtered(logits, temperature, top_p, *, top_k: int, use_top_p: bool):
    """``(values [B, C], ids [B, C] | None)``: the distribution a draw samples from, after top-k.

    Filtered-out candidates hold ``-inf``. ``ids`` is None when nothing is filtered (C = vocab in
    token order); otherwise ``values[b, c]`` is the scaled logit of token ``ids[b, c]``. Top-p
    without top-k is ``nucleus_draw``, not this function.
    """
    scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k <= 0:
        return scaled, None
    values, ids = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))  # descending; ties: lower id first
    if use_top_p:
        values = jnp.where(_nucleus_mask(values, top_p), values, -jnp.inf)
    return values, ids


def nucleus_draw(scaled, keys, top_p, window: int = NUCLEUS_WINDOW):
    """``[B]`` tokens drawn from the top-p set of ``softmax(scaled [B, V])``.

    Rows whose nucleus ends inside their ``window`` most likely tokens draw from that sorted window
    (exactly the sorted rule: the window is the head of the full order); only when some row's does
    not is the full-vocabulary ``nucleus_keep`` computed, and only such rows use it (drawing in token
    order), so a row's token never depends on the other rows of the batch.
    """
    window = min(window, scaled.shape[-1])
    values, ids = jax.lax.top_k(scaled, window)  # [B, W] descending; ties: lower id first
    probs = jnp.exp(values - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))  # full-vocabulary mass
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    inside = ~keep[:, -1] if window < scaled.shape[-1] else jnp.ones(keep.shape[:1], bool)  # [B]
    head = jnp.take_along_axis(ids, categorical(keys, jnp.where(keep, values, -jnp.inf))[:, None], axis=-1)[:, 0]

    def full_search():
        tail = categorical(keys, jnp.where(nucleus_keep(scaled, top_p), scaled, -jnp.inf))
        return jnp.where(inside, head, tail)

    return jax.lax.cond(jnp.all(inside), lambda: head, full_search)


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
        return first_argmax(logits)
    if use_top_p and top_k <= 0:
        scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
        return nucleus_draw(scaled, keys, top_p).astype(jnp.int32)
    values, ids = _top_k_filtered(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    # Per-row keys (not one key for the batch) so a row's draw does not depend on the batch size.
    choice = categorical(keys, values)  # [B]
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def first_argmax(logits):
    """``[B]`` int32: ``jnp.argmax`` over the last axis (first index of the maximum; a NaN counts as
    the maximum), as a max and a masked min. XLA:CPU runs argmax as a two-operand reduction that
    is not vectorised: ~3 ms for [8, 151936] fp32 on two cores, this ~0.5 ms. The greedy decode step
    uses ``greedy_tokens_and_logprobs``, the same rule with the max shared by the log-prob.
    """
    return _first_hit(logits, jnp.max(logits, axis=-1, keepdims=True))


def token_logprobs(logits, tokens, temperature=1.0):
    """Log-prob of ``tokens [B]`` under ``softmax(logits [B, V] / temperature)``.

    Never the top-k/top-p filtered distribution: GRPO's importance ratio compares against the
    trainer's log-softmax of the same fp32 logits at the same temperature (TRL and verl divide
    the logits by the sampling temperature in both places). As ``(x_t - m) / T - log sum exp((x -
    m) / T)`` with ``m`` the row max, so the division sits inside the exp-sum and no [B, V]
    array of ``logits / T`` is written.
    """
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return (picked - top[:, 0]) / temperature - _log_sum_exp_below(logits, top, temperature)


def greedy_tokens_and_logprobs(logits, temperature=1.0):
    """``first_argmax(logits)`` and its ``token_logprobs``, sharing one max over the vocabulary.

    The greedy token's logit is the row max, so its log-prob is ``-log sum exp((x - max) / T)``:
    three reads of ``logits [B, V]`` (max, masked min, exp-sum) and no [B, V] array written, where
    the two ops apart took six and wrote two (a decode step's vocabulary work, profiled at
    [16, 151936] on two CPU cores, fell from ~10 to ~7.5 ms).
    A row holding a NaN gets the first NaN's index and a NaN log-prob, as the two ops apart.
    """
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]; NaN if the row holds one
    tokens = _first_hit(logits, top)
    return tokens, -_log_sum_exp_below(logits, top, temperature)


def _log_sum_exp_below(logits, top, temperature):
    """``[B]``: ``log sum exp((logits - top) / temperature)`` for the row max ``top [B, 1]``."""
    return jnp.log(jnp.sum(jnp.exp((logits - top) / temperature), axis=-1))


def _first_hit(logits, top):
    """``[B]`` int32: the first index where ``logits`` equals ``top [B, 1]`` or is NaN."""
    hit = (logits == top) | jnp.isnan(logits)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, ids, logits.shape[-1] - 1), axis=-1)


def row_keys(seeds, rows, step):
    """``[B]`` keys: each row's id and the step folded into the key of its seed (``seeds [B]``
    uint32, ``rows [B]`` int32; ``batch.row_streams``)."""
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), step))(seeds, rows)


def match_stop_sequences(recent, stop_seqs):
    """``[B]`` bool: the last tokens of a row equal one of the stop sequences.

    recent [B, W] holds each row's last W generated tokens (oldest first); stop_seqs [S, W] are
    right-aligned token sequences left-padded with -1 (a wildcard: shorter sequences).
    """
    if stop_seqs.shape[0] == 0:
        return jnp.zeros(recent.shape[:1], bool)
    hit = (recent[:, None, :] == stop_seqs[None]) | (stop_seqs[None] < 0)  # [B, S, W]
    return jnp.any(jnp.all(hit, axis=-1), axis=-1)
