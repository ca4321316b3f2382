"""Ranking and distribution metrics over one fixed-shape group, in pure JAX.

Every function takes per-document arrays of shape ``[c]`` (one group; ``jax.vmap`` for a batch)
and boolean masks, so padded groups and sharded batches need no special casing. Ranks are built
from pairwise comparisons (O(c^2), tiny for c <= 100) instead of sorts: no gathers, trivially
vmappable and jittable.

trec_eval semantics (reproduced exactly, checked against pytrec_eval):

- the run is sorted by score descending; ties go to the larger docid string (trec_eval compares
  docnos with ``strcmp`` in reverse). JAX has no strings, so callers pass ``tie_key`` ``[c]``:
  distinct numbers, larger = ranked earlier among equal scores (e.g. the rank of each docid in
  ascending string order reproduces trec_eval);
- ``retrieved`` marks documents in the run, ``judged`` those in the qrels; gains of unjudged
  documents count as 0, and the ideal ranking uses every judged document, retrieved or not;
- NDCG@k: gain = relevance grade (linear, grades <= 0 give nothing), discount 1/log2(rank+1)
  with 1-based ranks, 0 when no judged document has a positive grade;
- Recall@k: relevant = grade >= ``relevance_level`` (trec_eval default 1), 0 when none.

RBO (rank-biased overlap, Webber et al. 2010) variant: finite-depth RBO over the whole group,
normalised so identical rankings score 1: ``(1-p)/(1-p^D) * sum_{d=1..D} p^(d-1) |A_:d ∩ B_:d|/d``
with D = the number of judged documents; documents missing from a ranking never overlap.

JS / KL: log base 2 by default (JS is then bounded by 1), over distributions restricted to the
mask; ``0·log(0/q) = 0``, and ``KL(p‖q)`` is +inf where ``q = 0 < p`` (as scipy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_RBO_P = 0.9  # Webber et al.'s common choice: ~86% of the weight on the top 10


def rank_positions(scores: jax.Array, tie_key: jax.Array, mask: jax.Array) -> jax.Array:
    """0-based position of each document in the descending ranking; ``c`` where not masked
    (so callers must still test the mask: ``c`` can be below a cutoff k).

    scores [c], tie_key [c] (distinct among masked; larger ranks first on equal scores),
    mask [c] bool -> [c] int32.
    """
    c = scores.shape[-1]
    s_i, s_j = scores[:, None], scores[None, :]  # [c, 1], [1, c]
    t_i, t_j = tie_key[:, None], tie_key[None, :]
    beats = (s_j > s_i) | ((s_j == s_i) & (t_j > t_i))  # [c, c]: doc j ranks before doc i
    position = jnp.sum(beats & mask[None, :], axis=-1).astype(jnp.int32)  # [c]
    return jnp.where(mask, position, c)


def _log2_discount(position: jax.Array) -> jax.Array:
    return 1.0 / jnp.log2(position.astype(jnp.float32) + 2.0)


def ndcg_at_k(
    scores: jax.Array,
    gains: jax.Array,
    retrieved: jax.Array,
    judged: jax.Array,
    tie_key: jax.Array,
    k: int,
) -> jax.Array:
    """trec_eval ``ndcg_cut.k`` for one group. All inputs [c]; returns a float32 scalar."""
    gain = jnp.where(judged, jnp.maximum(gains.astype(jnp.float32), 0.0), 0.0)  # [c]
    position = rank_positions(scores, tie_key, retrieved)  # [c]
    dcg = jnp.sum(jnp.where(retrieved & (position < k), gain * _log2_discount(position), 0.0))
    # The ideal ranking orders judged documents by gain; equal gains are interchangeable, so
    # any distinct tie key (here: position in the array) gives the same ideal DCG.
    order_key = -jnp.arange(gain.shape[-1], dtype=jnp.float32)
    ideal_position = rank_positions(gain, order_key, judged)  # [c]
    idcg = jnp.sum(jnp.where(judged & (ideal_position < k), gain * _log2_discount(ideal_position), 0.0))
    return jnp.where(idcg > 0, dcg / jnp.where(idcg > 0, idcg, 1.0), 0.0)


def recall_at_k(
    scores: jax.Array,
    gains: jax.Array,
    retrieved: jax.Array,
    judged: jax.Array,
    tie_key: jax.Array,
    k: int,
    relevance_level: float = 1.0,
) -> jax.Array:
    """trec_eval ``recall.k``: relevant retrieved in the top k / all judged relevant. Scalar."""
    relevant = judged & (gains >= relevance_level)  # [c]
    position = rank_positions(scores, tie_key, retrieved)  # [c]
    hits = jnp.sum(relevant & retrieved & (position < k)).astype(jnp.float32)
    total = jnp.sum(relevant).astype(jnp.float32)
    return jnp.where(total > 0, hits / jnp.maximum(total, 1.0), 0.0)


def rbo(pred_position: jax.Array, gold_position: jax.Array, depth: jax.Array, p: float = DEFAULT_RBO_P) -> jax.Array:
    """Normalised finite-depth RBO of two rankings given as 0-based positions [c].

    A document absent from a ranking must carry a position >= depth (``rank_positions`` gives
    ``c``). ``depth`` (scalar int, >= 1) is the evaluation depth D. Returns a float32 scalar.
    """
    c = pred_position.shape[-1]
    # A document is in both prefixes of length d iff max(position) < d.
    both = jnp.maximum(pred_position, gold_position)  # [c]
    d = jnp.arange(1, c + 1)  # [c] prefix lengths
    overlap = jnp.sum(both[None, :] < d[:, None], axis=-1).astype(jnp.float32)  # [c]: X_d
    weight = jnp.where(d <= depth, p ** (d - 1).astype(jnp.float32), 0.0)  # [c]
    total = jnp.sum(weight * overlap / d.astype(jnp.float32))
    norm = (1.0 - p**depth) / (1.0 - p)  # sum of the weights: identical rankings give 1
    return jnp.where(depth > 0, total / jnp.where(depth > 0, norm, 1.0), 0.0).astype(jnp.float32)


def normalize_sum(values: jax.Array, mask: jax.Array, epsilon: float) -> jax.Array:
    """(v + eps) / sum(v + eps) over the mask; eps keeps all-zero groups uniform. [c] -> [c]."""
    shifted = jnp.where(mask, jnp.maximum(values.astype(jnp.float32), 0.0) + epsilon, 0.0)
    total = jnp.sum(shifted)
    return shifted / jnp.where(total > 0, total, 1.0)


def normalize_softmax(values: jax.Array, mask: jax.Array, temperature: float) -> jax.Array:
    """softmax(v / T) over the mask, 0 elsewhere. [c] -> [c]."""
    logits = jnp.where(mask, values.astype(jnp.float32) / temperature, -jnp.inf)
    probs = jax.nn.softmax(logits)
    return jnp.where(mask, jnp.nan_to_num(probs), 0.0)


def _plogp_ratio(p: jax.Array, q: jax.Array) -> jax.Array:
    """Elementwise p*log(p/q) with 0 where p == 0 and +inf where q == 0 < p (natural log)."""
    safe_p = jnp.where(p > 0, p, 1.0)
    safe_q = jnp.where(q > 0, q, 1.0)
    term = p * (jnp.log(safe_p) - jnp.log(safe_q))
    return jnp.where(p > 0, jnp.where(q > 0, term, jnp.inf), 0.0)


def kl_divergence(p: jax.Array, q: jax.Array, mask: jax.Array, base: float = 2.0) -> jax.Array:
    """KL(p‖q) over the masked entries; p and q [c] are distributions. Scalar."""
    terms = jnp.where(mask, _plogp_ratio(p.astype(jnp.float32), q.astype(jnp.float32)), 0.0)
    return jnp.sum(terms) / jnp.log(base)


def js_divergence(p: jax.Array, q: jax.Array, mask: jax.Array, base: float = 2.0) -> jax.Array:
    """Jensen-Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2; in [0, 1] for base 2."""
    p, q = p.astype(jnp.float32), q.astype(jnp.float32)
    m = 0.5 * (p + q)
    js = 0.5 * kl_divergence(p, m, mask, base) + 0.5 * kl_divergence(q, m, mask, base)
    return jnp.maximum(js, 0.0)  # rounding can give -1e-9 for identical inputs
