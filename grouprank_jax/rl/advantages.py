"""Group-relative advantages for GRPO (pure, jittable).

Rollouts of one prompt are contiguous: a flat ``[B*G]`` reward vector is the row-major
flattening of ``[B, G]`` (the order TRL's ``view(-1, G)`` and our rollout batcher use).

Std convention (documented because it changes advantages visibly at G = 8):
  * default ``ddof=1`` (unbiased, Bessel-corrected) and ``eps=1e-6`` added to the std, i.e.
    verl's ``compute_grpo_outcome_advantage`` (torch.std is unbiased), which the paper ran.
  * TRL 1.16 uses ``nanstd`` (also unbiased) + 1e-4: pass ``eps=1e-4`` to reproduce it.
  * A group of one (G = 1) gets mean 0 and std 1 like verl, so its advantage is its reward.
  * A group whose rewards are all equal gets advantage exactly 0 (see ``_centered``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

AdvantageFn = Callable[[jnp.ndarray, float, int], jnp.ndarray]


def _group_stats(r: jnp.ndarray, ddof: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-group mean and std of ``r`` [B, G] -> ([B, 1], [B, 1])."""
    if r.shape[-1] == 1:  # static: verl's singleton-group rule
        return jnp.zeros_like(r), jnp.ones_like(r)
    mean = jnp.mean(r, axis=-1, keepdims=True)  # [B, 1]
    std = jnp.std(r, axis=-1, keepdims=True, ddof=ddof)  # [B, 1]
    return mean, std


def _centered(r: jnp.ndarray, mean: jnp.ndarray) -> jnp.ndarray:
    """r - mean [B, G], exactly 0 for groups whose rewards are all equal.

    In float32 the mean of G equal values need not round back to that value, leaving
    r - mean ~ 1e-8 and std ~ 1e-8; divided by (std + 1e-6) that becomes a spurious
    advantage of a few percent. Identical rewards carry no signal, so we zero them.
    """
    if r.shape[-1] == 1:  # verl's singleton rule keeps the raw reward (mean is 0 there)
        return r - mean
    constant = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(constant, 0.0, r - mean)


def grpo_advantage(r: jnp.ndarray, eps: float, ddof: int) -> jnp.ndarray:
    """(r - mean) / (std + eps) within each group. ``r``: [B, G] -> [B, G]."""
    mean, std = _group_stats(r, ddof)
    return _centered(r, mean) / (std + eps)


def dr_grpo_advantage(r: jnp.ndarray, eps: float, ddof: int) -> jnp.ndarray:
    """r - mean within each group (Dr.GRPO drops the std: it up-weights easy/hard prompts)."""
    del eps, ddof  # same signature as the other estimators so the registry is uniform
    mean, _ = _group_stats(r, 0)
    return _centered(r, mean)


ADVANTAGE_FNS: dict[str, AdvantageFn] = {
    "grpo": grpo_advantage,
    "dr_grpo": dr_grpo_advantage,
}


def group_advantages(
    rewards: jnp.ndarray,
    mode: str = "grpo",
    *,
    group_size: int | None = None,
    eps: float = 1e-6,
    ddof: int = 1,
) -> jnp.ndarray:
    """Advantages of ``rewards`` [B, G] or [B*G] (then ``group_size`` is required).

    Returns the same shape as ``rewards``. ``mode``, ``group_size`` and ``ddof`` must be
    static under jit (they pick the code path and the reshape).
    """
    if mode not in ADVANTAGE_FNS:
        raise ValueError(f"advantage mode {mode!r}; choose one of {tuple(ADVANTAGE_FNS)}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim == 1:
        if group_size is None:
            raise ValueError("flat [B*G] rewards need group_size")
        if rewards.shape[0] % group_size:
            raise ValueError(f"{rewards.shape[0]} rewards are not a multiple of G={group_size}")
        grouped = rewards.reshape(-1, group_size)  # [B, G]
        return ADVANTAGE_FNS[mode](grouped, eps, ddof).reshape(-1)  # [B*G]
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [B, G] or [B*G], got shape {rewards.shape}")
    if group_size is not None and rewards.shape[1] != group_size:
        raise ValueError(f"rewards {rewards.shape} disagree with group_size={group_size}")
    return ADVANTAGE_FNS[mode](rewards, eps, ddof)  # [B, G]
