"""GRPO loss over per-token log-probabilities (pure, jittable).

Shapes: B = rollouts in the (micro-)batch, T = padded response length.
  logp, old_logp, ref_logp, mask, entropies: [B, T]; advantages: [B] (or [B, T]).

Three small registries make the variants named modes (Tunix / verl style):
  POLICY_LOSSES  "clip"  clipped surrogate, separate eps_low / eps_high, optional dual clip
  KL_ESTIMATORS  "k1" | "k2" | "k3"  (k3 = verl "low_var_kl", the paper's choice)
  AGGREGATIONS   "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm"

Composition (TRL style): the KL and entropy terms are added *per token* and the sum is
aggregated once: loss = agg(pg + beta * kl - ent_coef * H). verl aggregates pg and kl
separately with the same mode and adds beta * agg(kl); every aggregation here is linear in
the per-token values for a fixed mask, so both are identical (tests check it).

Mapping to TRL 1.16 ``loss_type`` (single process, no grad accumulation):
  grpo    <-> seq-mean-token-mean                (per-seq token mean, then batch mean)
  dapo    <-> token-mean                         (sum / active tokens in the batch)
  bnpo    <-> token-mean                         (same, local tokens)
  dr_grpo <-> seq-mean-token-sum-norm, norm_len = max_completion_length  (sum / (B * L))
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# ---- ratio --------------------------------------------------------------------------


def policy_ratio(logp, old_logp, log_ratio_clamp: float | None = 20.0):
    """exp(logp - old) per token. The log-ratio is clamped (verl / Tunix: +-20) so a stale or
    mismatched old logprob cannot overflow exp; inside the clamp the gradient is exact."""
    log_ratio = logp - old_logp  # [B, T]
    if log_ratio_clamp is not None:
        log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    return jnp.exp(log_ratio), log_ratio  # [B, T] each


# ---- policy losses: (ratio [B,T], adv [B,1]|[B,T], eps_low, eps_high, dual_clip) --------

PolicyLossFn = Callable[..., tuple[jnp.ndarray, dict[str, jnp.ndarray]]]


def clip_policy_loss(ratio, adv, eps_low: float, eps_high: float, dual_clip: float | None):
    """PPO/GRPO clipped surrogate, as a per-token loss to minimise.

    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)). With ``dual_clip = c`` (verl
    semantics, Ye et al. 2020) tokens with A < 0 are further capped at -A c, so a huge ratio
    on a bad token cannot produce an unbounded loss.
    Returns the per-token loss [B, T] and boolean hit masks [B, T] for the metrics.
    """
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    loss = jnp.maximum(unclipped, clipped)  # [B, T]
    hits = {
        # TRL's definitions: the clip is active only on the side that binds for the sign of A.
        "clip_low": (ratio < 1.0 - eps_low) & (adv < 0),
        "clip_high": (ratio > 1.0 + eps_high) & (adv > 0),
    }
    if dual_clip is not None:
        bound = -adv * dual_clip  # [B, T]
        hits["dual_clip"] = (adv < 0) & (loss > bound)
        loss = jnp.where(adv < 0, jnp.minimum(loss, bound), loss)
    return loss, hits


POLICY_LOSSES: dict[str, PolicyLossFn] = {"clip": clip_policy_loss}


# ---- KL estimators of KL(pi || ref), as functions of x = logp - ref ------------------


def kl_k1(x):
    """k1 = log pi - log ref: unbiased, high variance, can be negative."""
    return x


def kl_k2(x):
    """k2 = (log pi - log ref)^2 / 2: biased, low variance, >= 0."""
    return 0.5 * jnp.square(x)


def kl_k3(x):
    """k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman): unbiased, >= 0, low variance."""
    return jnp.exp(-x) + x - 1.0


KL_ESTIMATORS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}
# verl clamps only k3 ("low_var_kl"): log-ratio to +-20 (exp overflow) and the value to
# +-10. Clamped tokens get zero KL gradient; TRL has no clamp, equal whenever unsaturated.
_CLAMPED_KL = frozenset({"k3"})


def kl_penalty(
    logp, ref_logp, estimator: str = "k3", *, log_ratio_clamp: float | None = 20.0, value_clamp: float | None = 10.0
):
    """Per-token KL estimate [B, T]; the gradient flows through ``logp`` only."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r}; choose one of {tuple(KL_ESTIMATORS)}")
    x = logp - jax.lax.stop_gradient(ref_logp)  # [B, T]
    clamp = estimator in _CLAMPED_KL
    if clamp and log_ratio_clamp is not None:
        x = jnp.clip(x, -log_ratio_clamp, log_ratio_clamp)
    kl = KL_ESTIMATORS[estimator](x)  # [B, T]
    if clamp and value_clamp is not None:
        kl = jnp.clip(kl, -value_clamp, value_clamp)
    return kl


# ---- aggregation: (x [B,T], mask [B,T], norm_len, denom) -> scalar -------------------
# ``denom`` overrides the batch-level count (tokens for token-mean, sequences otherwise)
# so that micro-batch losses under gradient accumulation / data parallelism sum to the
# full-batch loss: pass the global count (TRL's num_items_in_batch, verl's global tokens).

AggFn = Callable[[jnp.ndarray, jnp.ndarray, int | None, jnp.ndarray | None], jnp.ndarray]


def agg_token_mean(x, mask, norm_len=None, denom=None):
    """sum over all active tokens / their count: every token weighs the same (DAPO)."""
    del norm_len
    count = jnp.maximum(jnp.sum(mask), 1.0) if denom is None else denom
    return jnp.sum(x * mask) / count


def agg_seq_mean_token_mean(x, mask, norm_len=None, denom=None):
    """Per-sequence token mean, then mean over sequences (original GRPO; length-biased)."""
    del norm_len
    lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)  # [B]; TRL clamps empty rows to 1
    per_seq = jnp.sum(x * mask, axis=-1) / lengths  # [B]
    count = x.shape[0] if denom is None else denom
    return jnp.sum(per_seq) / count


def agg_seq_mean_token_sum_norm(x, mask, norm_len=None, denom=None):
    """Token sums / a constant length, then mean over sequences (Dr.GRPO).

    ``norm_len`` defaults to the padded T (verl's ``loss_mask.shape[-1]``); pass the
    configured max response length to keep it constant across batches. Unlike verl's
    agg_loss we also divide by the sequence count, as Dr.GRPO and TRL do, so the loss
    scale does not grow with the batch.
    """
    length = x.shape[-1] if norm_len is None else norm_len
    count = x.shape[0] if denom is None else denom
    return jnp.sum(x * mask) / (count * length)


AGGREGATIONS: dict[str, AggFn] = {
    "token-mean": agg_token_mean,
    "seq-mean-token-mean": agg_seq_mean_token_mean,
    "seq-mean-token-sum-norm": agg_seq_mean_token_sum_norm,
}

# TRL 1.16 loss_type -> our aggregation (see the module docstring).
TRL_LOSS_TYPE_TO_AGG = {
    "grpo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def aggregate(x, mask, mode: str = "token-mean", *, norm_len=None, denom=None):
    """Reduce per-token values [B, T] to a scalar with the named aggregation."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode {mode!r}; choose one of {tuple(AGGREGATIONS)}")
    return AGGREGATIONS[mode](x, mask, norm_len, denom)


def masked_mean(x, mask):
    """Token-weighted mean, used for metrics regardless of the loss aggregation."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---- full loss ----------------------------------------------------------------------


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    policy_loss: str = "clip",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_value_clamp: float | None = 10.0,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    denom=None,
    entropies=None,
    entropy_coef: float = 0.0,
):
    """GRPO objective (paper Eq. 7) as a loss to minimise, and its metrics.

    ``logp`` [B, T] is the only differentiated input; ``old_logp``, ``ref_logp`` and
    ``advantages`` are constants of the step (stop_gradient'ed here so callers cannot leak
    gradients into the reference). ``ref_logp`` may be None when ``kl_coef == 0``. All keyword
    arguments except ``denom`` / arrays are static (they choose code paths).
    Returns (loss scalar, metrics dict of scalars).
    """
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss {policy_loss!r}; choose one of {tuple(POLICY_LOSSES)}")
    logp = logp.astype(jnp.float32)  # loss math in f32 even if the model runs in bf16
    mask = mask.astype(jnp.float32)  # [B, T]
    old_logp = jax.lax.stop_gradient(old_logp).astype(jnp.float32)
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    adv = adv[:, None] if adv.ndim == 1 else adv  # [B, 1] or [B, T]

    ratio, log_ratio = policy_ratio(logp, old_logp, log_ratio_clamp)  # [B, T]
    pg, hits = POLICY_LOSSES[policy_loss](ratio, adv, clip_eps_low, clip_eps_high, dual_clip)
    per_token = pg  # [B, T]

    agg = functools.partial(aggregate, mask=mask, mode=loss_agg_mode, norm_len=norm_len, denom=denom)
    metrics = {"pg_loss": agg(pg)}
    if kl_coef != 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef != 0 needs ref_logp")
        kl = kl_penalty(
            logp, ref_logp, kl_estimator, log_ratio_clamp=log_ratio_clamp, value_clamp=kl_value_clamp
        )  # [B, T]
        per_token = per_token + kl_coef * kl  # TRL: KL joins per token, before aggregation
        metrics["kl"] = masked_mean(kl, mask)
        metrics["kl_loss"] = agg(kl)
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies, mask)
        if entropy_coef != 0.0:
            # Same aggregation as the policy term (verl); entropies keep their gradient.
            per_token = per_token - entropy_coef * entropies

    loss = agg(per_token)
    metrics.update(
        loss=loss,
        ratio_mean=masked_mean(ratio, mask),
        ratio_max=jnp.max(jnp.where(mask > 0, ratio, 0.0)),  # ratio > 0: 0 marks 'no tokens'
        # verl's ppo_kl: mean(old - logp), how far this update has moved the policy.
        approx_kl_old=masked_mean(-log_ratio, mask),
        clip_frac_low=masked_mean(hits["clip_low"], mask),
        clip_frac_high=masked_mean(hits["clip_high"], mask),
        clip_frac=masked_mean(hits["clip_low"] | hits["clip_high"], mask),
        advantage_mean=masked_mean(jnp.broadcast_to(adv, mask.shape), mask),
        response_len_mean=jnp.mean(jnp.sum(mask, axis=-1)),
    )
    if "dual_clip" in hits:
        metrics["dual_clip_frac"] = masked_mean(hits["dual_clip"], mask)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def loss_kwargs(cfg) -> dict:
    """The static ``grpo_loss`` keyword arguments a ``GRPOConfig`` implies."""
    return dict(
        policy_loss=cfg.policy_loss,
        clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high,
        dual_clip=cfg.dual_clip,
        log_ratio_clamp=cfg.log_ratio_clamp,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        kl_value_clamp=cfg.kl_value_clamp,
        loss_agg_mode=cfg.loss_agg_mode,
        # Dr.GRPO's divisor must not follow the batch's padded length (the trainer pads responses to
        # a bucket of the longest one, so that would rescale the loss step to step): TRL divides
        # by max_completion_length, verl by its fixed response_length.
        norm_len=cfg.max_response_len if cfg.loss_norm_len is None else cfg.loss_norm_len,
        entropy_coef=cfg.entropy_coef,
    )
