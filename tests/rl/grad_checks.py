"""Exact gradient comparisons for GRPO update tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def gradient_recorder() -> optax.GradientTransformation:
    """Test double of an optimizer: leaves the weights alone and keeps the last gradient as its
    state, so the update's gradient is read exactly (not as a difference of weights)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def assert_gradients_close(grads, oracle, what):
    """Every leaf within 1e-5 of its own scale (plus 1e-7 of the whole gradient's): an absolute
    1e-5 alone would pass a wrong attention gradient, whose true size here is ~1e-9."""
    total = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(oracle))))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(oracle)):
        err, scale = float(np.linalg.norm(got - want)), float(np.linalg.norm(want))
        where = f"{what} {jax.tree_util.keystr(path)}"
        assert err <= 1e-5 * scale + 1e-7 * total, f"{where}: |diff| {err:.3g}, |grad| {scale:.3g}"
