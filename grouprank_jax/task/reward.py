"""The GroupRank heterogeneous reward (paper-notes §3, Eq. 4-6), jitted and vmapped over B.

    R = R_G     if tags ok and JSON ok (format_status 0)
    R = -0.1    if tags ok but JSON bad (status 1)
    R = -0.5    otherwise (status 2)
    R_G = ndcg_weight·NDCG@k + recall_weight·Recall@k + alignment_weight·(1 - JS(P, Q))

INFERRED choices (the paper leaves them open; each is a ``RewardConfig`` field):

- gold ``[B, c]`` are graded teacher scores (0..10); NDCG uses them as linear gains (trec_eval
  style), Recall@k counts documents with gold >= ``relevance_threshold`` (5 = "moderately
  helpful" and up on the prompt's scale) as relevant;
- the predicted ranking sorts valid predicted scores descending; ties go to the earlier
  position in the group (``tie_break="position"``; groups are shuffled, so this is unbiased) or,
  with ``"pessimistic"``, to the document with the LOWER gold score, so ties never pay;
- missing ids (``valid`` False inside the group mask), ``missing_policy``:
  ``"drop"`` (default) leaves them out of the predicted ranking: they earn no gain and no
  recall, so omitting a document costs reward even when c <= k; ``"rank_last"`` ranks them after
  every valid document (score -1); ``"format_penalty"`` treats any missing id as a JSON failure
  (-0.1), like ReasonRank's wrong-count rule. Missing documents get predicted mass 0 in P.
  Under every policy an answer that scores none of the group's documents (``{}``, or only
  unknown keys) earns the bad-JSON reward: it carries no ranking, and a uniform P alone would
  otherwise pay ~+0.1 of alignment, above an honest JSON failure;
- P and Q: ``"sum"`` normalisation (s + eps) / Σ(s + eps) over the group (eps keeps all-zero
  groups defined, and uniform), or ``"softmax"`` with ``softmax_temperature``;
- JS in bits, so 1 - JS is in [0, 1]; with ``divergence="kl"`` (the v1 abstract's wording) the
  alignment is exp(-KL(Q‖P)) in bits, again in (0, 1] (KL direction: gold as reference);
- ``ranking_terms``: ``"ndcg"`` (the paper), ``"rbo"`` (RBO replaces NDCG, ReasonRank-like) or
  ``"ndcg+rbo"`` (both, RBO weighted by ``rbo_weight``), RBO between the predicted ranking and
  the gold ranking (gold descending, ties by position).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from grouprank_jax.task import metrics

DIVERGENCES = ("js", "kl")
RANKING_TERMS = ("ndcg", "rbo", "ndcg+rbo")
NORMALIZATIONS = ("sum", "softmax")
MISSING_POLICIES = ("drop", "rank_last", "format_penalty")
TIE_BREAKS = ("position", "pessimistic")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    ndcg_weight: float = 1.0  # §3 Eq. 5: NDCG@10 enters with weight 1
    recall_weight: float = 0.2  # §3 Eq. 5: γ = 0.2 on Recall@10
    alignment_weight: float = 0.1  # §3 Eq. 5: ε = 0.1 on (1 - JS)
    k: int = 10  # §3: NDCG@10 and Recall@10 ("Top-10 candidates" in Fig. 2)
    divergence: str = "js"  # §3: v3 uses JS; "kl" follows the v1 abstract (§0)
    ranking_terms: str = "ndcg"  # §3 uses NDCG only; "rbo"/"ndcg+rbo" mirror ReasonRank (§9) [INFERRED]
    rbo_weight: float = 0.1  # §9: ReasonRank's 0.1·RBO [INFERRED for GroupRank]
    rbo_p: float = metrics.DEFAULT_RBO_P  # §3 does not use RBO; 0.9 is the common choice [INFERRED]
    bad_json_reward: float = -0.1  # §3 Eq. 4: correct tags but invalid JSON
    bad_tags_reward: float = -0.5  # §3 Eq. 4: anything else
    relevance_threshold: float = 5.0  # §3 "relevant docs" unspecified: gold >= 5 counts [INFERRED]
    normalization: str = "sum"  # §3 P, Q "score distributions": s/Σs [INFERRED]; or "softmax"
    softmax_temperature: float = 1.0  # only for normalization="softmax" [INFERRED]
    epsilon: float = 1e-6  # §3 note: keeps all-zero groups defined [INFERRED]
    missing_policy: str = "drop"  # §3 missing ids unspecified [INFERRED]; see module docstring
    tie_break: str = "position"  # §3 ties unspecified [INFERRED]; or "pessimistic"

    def __post_init__(self):
        for field, allowed in (
            ("divergence", DIVERGENCES),
            ("ranking_terms", RANKING_TERMS),
            ("normalization", NORMALIZATIONS),
            ("missing_policy", MISSING_POLICIES),
            ("tie_break", TIE_BREAKS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"RewardConfig.{field}={getattr(self, field)!r}; choose one of {allowed}")
        if self.k < 1:
            raise ValueError(f"RewardConfig.k must be >= 1, got {self.k}")
        if not 0.0 < self.rbo_p < 1.0:
            raise ValueError(f"RewardConfig.rbo_p must be in (0, 1), got {self.rbo_p}")
        if self.softmax_temperature <= 0 or self.epsilon < 0:
            raise ValueError("RewardConfig needs softmax_temperature > 0 and epsilon >= 0")


def _distribution(values: jax.Array, mask: jax.Array, cfg: RewardConfig) -> jax.Array:
    if cfg.normalization == "softmax":
        return metrics.normalize_softmax(values, mask, cfg.softmax_temperature)
    return metrics.normalize_sum(values, mask, cfg.epsilon)


def _group_reward(pred, valid, status, gold, mask, cfg: RewardConfig) -> dict[str, jax.Array]:
    """One group: pred, valid, gold, mask [c]; status scalar -> dict of scalars."""
    c = pred.shape[-1]
    position_key = -jnp.arange(c, dtype=jnp.float32)  # earlier position wins a tie
    gold = gold.astype(jnp.float32)
    valid = valid & mask
    if cfg.tie_break == "pessimistic":
        # Among equal predicted scores, the lowest-gold document ranks first.
        tie_key = -metrics.rank_positions(-gold, position_key, mask).astype(jnp.float32)
    else:
        tie_key = position_key
    if cfg.missing_policy == "rank_last":
        ranked_scores, retrieved = jnp.where(valid, pred, -1.0), mask
    else:
        ranked_scores, retrieved = pred, valid

    ndcg = metrics.ndcg_at_k(ranked_scores, gold, retrieved, mask, tie_key, cfg.k)
    recall = metrics.recall_at_k(ranked_scores, gold, retrieved, mask, tie_key, cfg.k, cfg.relevance_threshold)
    pred_position = metrics.rank_positions(ranked_scores, tie_key, retrieved)  # [c]
    gold_position = metrics.rank_positions(gold, position_key, mask)  # [c]
    rbo = metrics.rbo(pred_position, gold_position, jnp.sum(mask), cfg.rbo_p)

    p = _distribution(jnp.where(valid, pred, 0.0), mask, cfg)  # [c] predicted
    q = _distribution(gold, mask, cfg)  # [c] gold
    js = metrics.js_divergence(p, q, mask)
    kl = metrics.kl_divergence(q, p, mask)
    alignment = 1.0 - js if cfg.divergence == "js" else jnp.exp(-kl)

    ranking = {"ndcg": cfg.ndcg_weight * ndcg, "rbo": cfg.rbo_weight * rbo}
    ranking_utility = (
        ranking["ndcg"] + ranking["rbo"] if cfg.ranking_terms == "ndcg+rbo" else ranking[cfg.ranking_terms]
    )
    group_reward = ranking_utility + cfg.recall_weight * recall + cfg.alignment_weight * alignment

    json_bad = (status == 1) | ~jnp.any(valid & mask)  # an answer scoring no document is no answer
    if cfg.missing_policy == "format_penalty":
        json_bad = json_bad | ~jnp.all(valid == mask)
    reward = jnp.where(status >= 2, cfg.bad_tags_reward, jnp.where(json_bad, cfg.bad_json_reward, group_reward))
    size = jnp.maximum(jnp.sum(mask), 1)
    return {
        "reward": reward.astype(jnp.float32),
        "group_reward": group_reward.astype(jnp.float32),
        "ndcg": ndcg,
        "recall": recall,
        "rbo": rbo,
        "js": js,
        "kl": kl,
        "alignment": alignment.astype(jnp.float32),
        "valid_fraction": (jnp.sum(valid) / size).astype(jnp.float32),
        "format_ok": (status == 0).astype(jnp.float32),
        # the reward is the group reward (not a penalty): what ranking metrics are averaged over
        "rewarded": ((status == 0) & ~json_bad).astype(jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("cfg",))
def compute_rewards(
    pred_scores: jax.Array,  # [B, c] parsed 0..10 scores
    valid: jax.Array,  # [B, c] bool, from parsing
    format_status: jax.Array,  # [B] int 0/1/2, from parsing
    gold: jax.Array,  # [B, c] gold teacher scores
    group_mask: jax.Array,  # [B, c] bool, False on padding
    cfg: RewardConfig = RewardConfig(),
) -> dict[str, jax.Array]:
    """Reward and every component, each [B]. Pure jnp: works on inputs sharded along B."""
    per_group = functools.partial(_group_reward, cfg=cfg)
    return jax.vmap(per_group)(
        pred_scores.astype(jnp.float32),
        valid.astype(bool),
        format_status.astype(jnp.int32),
        gold,
        group_mask.astype(bool),
    )
