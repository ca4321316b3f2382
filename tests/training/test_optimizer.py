"""The learning-rate schedules of ``make_optimizer``, read off Adam's steps.

With a constant gradient, Adam's bias-corrected update is the learning rate itself (m̂ = g,
v̂ = g², so m̂ / √v̂ = 1 up to eps and float32 rounding, ~1e-5), so the parameter's change at
each step is minus the schedule's value there; the reference values are computed here with
math, not with optax.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.training.state import make_optimizer


def _step_sizes(tx, steps: int) -> np.ndarray:
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    grads = {"w": jnp.full((2, 2), 0.5)}
    sizes = []
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        sizes.append(-float(updates["w"][0, 0]))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return np.asarray(sizes)


def test_constant_schedule_with_and_without_warmup():
    np.testing.assert_allclose(
        _step_sizes(make_optimizer(1e-3, 8, max_grad_norm=None, schedule="constant"), 8), 1e-3, rtol=1e-4
    )
    want = [0.0, 1e-3 / 3, 2e-3 / 3] + [1e-3] * 5
    np.testing.assert_allclose(
        _step_sizes(make_optimizer(1e-3, 8, warmup_steps=3, max_grad_norm=None, schedule="constant"), 8),
        want,
        rtol=1e-4,
        atol=1e-12,
    )


def test_cosine_schedule_decays_to_floor():
    total, floor = 8, 0.1
    got = _step_sizes(make_optimizer(1e-3, total, max_grad_norm=None, min_lr_ratio=floor), total)
    want = [1e-3 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / total))) for t in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_schedules_share_the_state_structure_and_reject_unknown_names():
    params = {"w": jnp.ones((2, 2))}
    structures = {jax.tree.structure(make_optimizer(1e-3, 8, schedule=s).init(params)) for s in ("constant", "cosine")}
    assert len(structures) == 1  # a checkpoint restores under either schedule
    with pytest.raises(ValueError, match="schedule"):
        make_optimizer(1e-3, 8, schedule="linear")


def test_weight_decay_skips_biases_and_norms_by_name():
    """With zero gradients Adam's step is 0, so a parameter moves only by decoupled weight decay:
    kernels and the embedding move by -lr * wd * p; the q/k/v biases ([heads, head_dim], 2-D)
    and the norm scales do not move."""
    from flax import nnx

    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model

    params = nnx.state(create_model(model_preset("tiny"), seed=0), nnx.Param)
    params = jax.tree.map(jnp.ones_like, params)  # non-zero everywhere (the biases start at 0)
    tx = make_optimizer(0.1, total_steps=10, weight_decay=0.5, max_grad_norm=None, schedule="constant")
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    _, state = tx.update(zeros, state, params)  # the warmup step (learning rate 0)
    updates, _ = tx.update(zeros, state, params)
    step = {
        jax.tree_util.keystr(k): float(jnp.max(jnp.abs(u))) for k, u in jax.tree_util.tree_leaves_with_path(updates)
    }
    skipped = {k for k in step if "bias" in k or "norm" in k}
    assert any("['q_proj']['bias']" in k for k in skipped) and any("final_norm" in k for k in skipped)
    assert {k: step[k] for k in skipped} == dict.fromkeys(skipped, 0.0)
    assert {k: step[k] for k in set(step) - skipped} == pytest.approx(dict.fromkeys(set(step) - skipped, 0.1 * 0.5))


def test_grpo_optimizer_takes_weight_decay_from_config():
    """grpo.weight_decay reaches AdamW (verl's 0.01 by default): with zero gradients a kernel
    moves by exactly lr * wd * p."""
    from grouprank_jax.rl.config import GRPOConfig
    from grouprank_jax.rl.step import make_grpo_optimizer

    assert (GRPOConfig().weight_decay, GRPOConfig().max_grad_norm) == (0.01, 1.0)
    params = {"kernel": jnp.ones((2, 3))}
    for wd in (0.01, 0.5):
        tx = make_grpo_optimizer(GRPOConfig(learning_rate=0.1, weight_decay=wd), total_updates=10)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        assert float(jnp.max(jnp.abs(updates["kernel"]))) == pytest.approx(0.1 * wd)
