"""GRPO loss: oracle against TRL 1.16's own ``GRPOTrainer._compute_loss``, plus hand checks.

The oracle calls the pinned trl==1.16.0 method itself (trl/trainer/grpo_trainer.py
L3020-3291) on a stub ``self``: the stub's ``_get_per_token_logps_and_entropies`` returns our
per-token logprob tensor (a torch leaf), so TRL's ratio, clipping, k3 KL (L3098-3103, added
per token at L3149-3150) and loss_type normalisation (L3153-3184) run unmodified, and
autograd gives the gradient w.r.t. the per-token logprobs. Stub settings: one process, no
gradient accumulation, token-level importance sampling, no vLLM / entropy mask / OPSM.
"""

import dataclasses
import functools
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.rl.losses import (
    AGGREGATIONS,
    TRL_LOSS_TYPE_TO_AGG,
    aggregate,
    grpo_loss,
    kl_penalty,
    loss_kwargs,
)

B, T, MAX_LEN = 8, 12, 16  # MAX_LEN > T: dr_grpo's constant must not silently be T
EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric (DAPO clip-higher) so each side is exercised


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    logp = rng.uniform(-3.0, -0.05, size=(B, T)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.3, size=(B, T))).astype(np.float32)  # ratios cross both clips
    ref = (logp + rng.normal(0.0, 0.5, size=(B, T))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, size=(B,)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)  # right-padded
    return SimpleNamespace(logp=logp, old=old, ref=ref, adv=adv, mask=mask)


def _trl_loss_and_grad(loss_type, b, beta):
    from trl.trainer.grpo_trainer import GRPOTrainer

    logp = torch.tensor(b.logp, requires_grad=True)
    passthrough = SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=passthrough,
        max_completion_length=MAX_LEN,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    mask = torch.tensor(b.mask).long()
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(b.adv),
        "old_per_token_logps": torch.tensor(b.old),
        "ref_per_token_logps": torch.tensor(b.ref),
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.item(), logp.grad.numpy(), {k: v[-1] for k, v in stub._metrics["train"].items()}


def _ours(b, **kw):
    fn = lambda lp: grpo_loss(lp, b.old, b.ref, b.adv, b.mask, **kw)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(b.logp))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("beta", [0.001, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_matches_trl_compute_loss(batch, loss_type, beta):
    trl_loss, trl_grad, trl_metrics = _trl_loss_and_grad(loss_type, batch, beta)
    mode = TRL_LOSS_TYPE_TO_AGG[loss_type]
    loss, grad, metrics = _ours(
        batch,
        clip_eps_low=EPS_LOW,
        clip_eps_high=EPS_HIGH,
        kl_coef=beta,
        kl_estimator="k3",
        loss_agg_mode=mode,
        norm_len=MAX_LEN if mode == "seq-mean-token-sum-norm" else None,
    )
    # Measured: loss within 9e-8, gradient within 2e-9 (fp32 summation order).
    assert abs(loss - trl_loss) < 2e-7
    np.testing.assert_allclose(grad, trl_grad, atol=1e-8, rtol=0)
    assert np.abs(trl_grad).max() > 1e-3  # the comparison is not vacuous
    # The KL term on its own, relative to its size: at beta=0.001 its gradient (~3e-5) is far
    # below any absolute tolerance a loss-level check could afford. Measured within 1e-7.
    _, trl_grad0, _ = _trl_loss_and_grad(loss_type, batch, 0.0)
    _, grad0, _ = _ours(
        batch,
        clip_eps_low=EPS_LOW,
        clip_eps_high=EPS_HIGH,
        kl_coef=0.0,
        loss_agg_mode=mode,
        norm_len=MAX_LEN if mode == "seq-mean-token-sum-norm" else None,
    )
    kl_trl, kl_ours = trl_grad - trl_grad0, grad - grad0
    assert np.abs(kl_trl).max() > 0.5 * beta * 1e-2  # the KL gradient is there
    assert np.abs(kl_ours - kl_trl).max() <= 1e-6 * np.abs(kl_trl).max()
    # Metrics use TRL's definitions too.
    assert abs(metrics["kl"] - trl_metrics["kl"]) < 1e-5
    assert abs(metrics["clip_frac_low"] - trl_metrics["clip_ratio/low_mean"]) < 1e-6
    assert abs(metrics["clip_frac_high"] - trl_metrics["clip_ratio/high_mean"]) < 1e-6
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_per_token_kl_equals_separate_aggregation(batch, mode):
    """TRL adds beta*kl per token; verl adds beta*agg(kl). Same aggregation => same loss/grad."""
    beta = 0.04

    def verl_style(lp):
        pg, _ = grpo_loss(lp, batch.old, None, batch.adv, batch.mask, loss_agg_mode=mode)
        kl = kl_penalty(lp, batch.ref, "k3")
        return pg + beta * aggregate(kl, jnp.asarray(batch.mask), mode)

    lp = jnp.asarray(batch.logp)
    ours = lambda x: grpo_loss(x, batch.old, batch.ref, batch.adv, batch.mask, kl_coef=beta, loss_agg_mode=mode)[0]
    np.testing.assert_allclose(float(ours(lp)), float(verl_style(lp)), rtol=1e-5)  # f32 sum order
    np.testing.assert_allclose(np.asarray(jax.grad(ours)(lp)), np.asarray(jax.grad(verl_style)(lp)), atol=1e-7)


def test_on_policy_ratio_is_one_and_grad_is_minus_advantage(batch):
    lp = jnp.asarray(batch.logp)
    mask = jnp.asarray(batch.mask)
    fn = lambda x: grpo_loss(x, x, None, batch.adv, mask, loss_agg_mode="token-mean")
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(lp)
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    assert float(metrics["clip_frac"]) == 0.0
    n = float(mask.sum())
    expected = -batch.adv[:, None] * batch.mask / n  # d/dlogp of -A*r summed over tokens / N
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-7)
    want = -(batch.adv[:, None] * batch.mask).sum() / n
    np.testing.assert_allclose(float(loss), float(want), atol=1e-6)


def test_dual_clip_caps_negative_advantage_loss():
    # token 0: A<0 with ratio e^2 -> PPO loss 7.39*|A| capped at c*|A| = 3|A|, zero gradient.
    # token 1: A>0 with the same ratio -> ordinary clip at 1+eps, dual clip must not touch it.
    logp = jnp.array([[0.0], [0.0]])
    old = jnp.array([[-2.0], [-2.0]])
    adv = jnp.array([-1.5, 1.5])
    mask = jnp.ones((2, 1))
    fn = lambda x, c: grpo_loss(x, old, None, adv, mask, dual_clip=c, loss_agg_mode="seq-mean-token-mean")
    (loss, m), grad = jax.value_and_grad(lambda x: fn(x, 3.0), has_aux=True)(logp)
    np.testing.assert_allclose(float(loss), (3.0 * 1.5 + -1.5 * 1.2) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), 0.0)
    assert float(m["dual_clip_frac"]) == 0.5
    loss_no_dual, _ = fn(logp, None)
    np.testing.assert_allclose(float(loss_no_dual), (1.5 * np.exp(2.0) - 1.5 * 1.2) / 2, rtol=1e-6)


def test_kl_estimators_match_numpy():
    rng = np.random.default_rng(2)
    logp = rng.uniform(-4, 0, size=(3, 5)).astype(np.float32)
    ref = rng.uniform(-4, 0, size=(3, 5)).astype(np.float32)
    d = ref.astype(np.float64) - logp
    hand = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1.0}
    for name, want in hand.items():
        got = kl_penalty(logp, ref, name, value_clamp=None)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert (hand["k3"] > 10).any()  # this data reaches verl's k3 value clamp
    np.testing.assert_allclose(
        np.asarray(kl_penalty(logp, ref, "k3")), np.clip(hand["k3"], -10, 10), rtol=1e-5, atol=1e-6
    )
    assert (np.asarray(kl_penalty(logp, ref, "k3")) >= 0).all()


def test_k3_clamps_like_verl_and_gradient_flows_to_logp_only():
    logp = jnp.array([[-30.0, -1.0]])
    ref = jnp.array([[-1.0, -1.5]])  # token 0: ref - logp = 29 -> exp overflow territory
    kl = kl_penalty(logp, ref, "k3")
    assert float(kl[0, 0]) == 10.0  # value clamp
    unclamped = float(kl_penalty(logp, ref, "k3", value_clamp=None)[0, 0])
    assert unclamped == pytest.approx(np.exp(20) - 21, rel=1e-6)  # log-ratio clamp at 20
    g_logp, g_ref = jax.grad(lambda a, b: kl_penalty(a, b, "k3").sum(), argnums=(0, 1))(logp, ref)
    assert float(g_logp[0, 0]) == 0.0  # saturated token: no gradient, as in verl
    np.testing.assert_allclose(float(g_logp[0, 1]), 1.0 - np.exp(-0.5), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_ref), 0.0)
    assert float(kl_penalty(logp, ref, "k1")[0, 0]) == -29.0  # k1/k2 unclamped, as in verl


def test_log_ratio_clamp_prevents_overflow():
    loss, m = grpo_loss(jnp.array([[0.0]]), jnp.array([[-100.0]]), None, jnp.array([-1.0]), jnp.ones((1, 1)))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(m["ratio_max"]), np.exp(20.0), rtol=1e-5)


def test_sum_norm_defaults_to_padded_length_and_uses_config(batch):
    x, mask = jnp.asarray(batch.logp), jnp.asarray(batch.mask)
    a = aggregate(x, mask, "seq-mean-token-sum-norm")
    b = aggregate(x, mask, "seq-mean-token-sum-norm", norm_len=MAX_LEN)
    np.testing.assert_allclose(float(a), (batch.logp * batch.mask).sum() / (B * T), rtol=1e-6)
    np.testing.assert_allclose(float(a) * T / MAX_LEN, float(b), rtol=1e-6)


def test_config_sum_norm_divisor_is_max_response_len_whatever_the_padding(batch):
    """Through ``loss_kwargs`` the Dr.GRPO loss of a batch is the same padded to T or to 2T (the
    trainer's response bucket follows the longest response of each batch)."""
    cfg = GRPOConfig(loss_agg_mode="seq-mean-token-sum-norm", max_response_len=MAX_LEN)
    kw = loss_kwargs(cfg)
    assert kw["norm_len"] == MAX_LEN and loss_kwargs(cfg.replace(loss_norm_len=7))["norm_len"] == 7
    pad = lambda x: jnp.pad(jnp.asarray(x), ((0, 0), (0, T)))
    short = grpo_loss(batch.logp, batch.old, batch.ref, batch.adv, batch.mask, **kw)[0]
    long = grpo_loss(pad(batch.logp), pad(batch.old), pad(batch.ref), batch.adv, pad(batch.mask), **kw)[0]
    np.testing.assert_allclose(float(short), float(long), rtol=1e-6)
    # ... and it is TRL's dr_grpo value (test_matches_trl_compute_loss checks norm_len=MAX_LEN there).
    explicit = grpo_loss(batch.logp, batch.old, batch.ref, batch.adv, batch.mask, **{**kw, "norm_len": MAX_LEN})[0]
    np.testing.assert_allclose(float(short), float(explicit), rtol=1e-7)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_global_denominator_makes_microbatches_sum_to_full_batch(batch, mode):
    full = lambda x: grpo_loss(x, batch.old, batch.ref, batch.adv, batch.mask, kl_coef=0.01, loss_agg_mode=mode)[0]
    denom = batch.mask.sum() if mode == "token-mean" else float(B)
    h = B // 2

    def split(x):
        parts = [
            grpo_loss(
                x[s],
                batch.old[s],
                batch.ref[s],
                batch.adv[s],
                batch.mask[s],
                kl_coef=0.01,
                loss_agg_mode=mode,
                denom=denom,
            )[0]
            for s in (slice(0, h), slice(h, B))
        ]
        return parts[0] + parts[1]

    lp = jnp.asarray(batch.logp)
    np.testing.assert_allclose(float(split(lp)), float(full(lp)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(split)(lp)), np.asarray(jax.grad(full)(lp)), atol=1e-7)


def test_entropy_bonus_and_metric(batch):
    ent = np.full((B, T), 0.9, np.float32)
    base, _ = grpo_loss(batch.logp, batch.old, None, batch.adv, batch.mask, entropies=ent)
    bonus, m = grpo_loss(batch.logp, batch.old, None, batch.adv, batch.mask, entropies=ent, entropy_coef=0.01)
    np.testing.assert_allclose(float(m["entropy"]), 0.9, rtol=1e-6)
    np.testing.assert_allclose(float(base) - float(bonus), 0.01 * 0.9, rtol=1e-5)


def test_jit_and_vmap(batch):
    kw = loss_kwargs(GRPOConfig())
    fn = jax.jit(functools.partial(grpo_loss, **kw))
    eager, _ = grpo_loss(batch.logp, batch.old, batch.ref, batch.adv, batch.mask, **kw)
    jitted, metrics = fn(batch.logp, batch.old, batch.ref, batch.adv, batch.mask)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    assert set(metrics) >= {"loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean"}
    stack = lambda x: jnp.stack([jnp.asarray(x), jnp.asarray(x)])
    losses, _ = jax.vmap(functools.partial(grpo_loss, **kw))(
        stack(batch.logp), stack(batch.old), stack(batch.ref), stack(batch.adv), stack(batch.mask)
    )
    np.testing.assert_allclose(np.asarray(losses), float(eager), rtol=1e-6)


def test_config_defaults_are_the_paper_values():
    cfg = GRPOConfig()
    assert (cfg.rollouts_per_prompt, cfg.temperature) == (8, 1.0)
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.learning_rate) == (0.001, "k3", 1e-5)
    assert (cfg.global_batch_prompts, cfg.mini_batch_prompts, cfg.epochs) == (64, 64, 5)
    assert (cfg.max_prompt_len, cfg.max_response_len) == (24_000, 8_000)
    assert cfg.loss_agg_mode == "token-mean"
    assert (cfg.lora_rank, cfg.lora_alpha, len(cfg.lora_targets)) == (32, 32, 7)
    assert cfg.updates_per_rollout_batch == 1 and cfg.dual_clip is None and cfg.entropy_coef == 0.0
    assert cfg.group_sampling == "as_written" and cfg.group_size_range(0) == (5, 20)
    ramp = cfg.replace(group_sampling="redraw", group_size_curriculum=True, curriculum_steps=100)
    assert ramp.group_size_range(0) == (5, 5) and ramp.group_size_range(50) == (5, 12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kl_coef = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        dict(loss_agg_mode="seq-sum"),
        dict(kl_estimator="abs"),
        dict(advantage="ppo"),
        dict(dual_clip=1.0),
        dict(mini_batch_prompts=48),
        dict(group_sampling="shuffle"),
        dict(group_size_curriculum=True, curriculum_steps=10),  # the curriculum ramps redrawn sizes
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GRPOConfig(**bad)
