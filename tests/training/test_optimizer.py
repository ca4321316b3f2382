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
