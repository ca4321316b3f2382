"""The one jitted gradient-accumulation-and-update path of both stages.

``sum_gradients`` sums ``value_and_grad`` of a loss over micro-batches stacked on a leading axis
(a ``lax.scan``, so one micro-batch's activations are live at a time); ``apply_gradients`` is the
optax update. SFT divides the summed gradient by the step's loss tokens afterwards; GRPO's loss
already divides each micro-batch by the whole mini-batch's count (the global denominator). Either
way the accumulated update equals the update on the unsplit batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any], tuple[jax.Array, Any]]  # (trainable, micro_batch) -> (loss, aux)


def sum_gradients(loss_fn: LossFn, trainable, stacked) -> tuple[jax.Array, Any, Any]:
    """(sum of losses, sum of gradients w.r.t. ``trainable``, aux stacked per micro-batch) over
    the micro-batches of ``stacked`` (every leaf ``[num_micro, ...]``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if jax.tree.leaves(stacked)[0].shape[0] == 1:
        (loss, aux), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], stacked))
        return loss, grads, jax.tree.map(lambda x: x[None], aux)

    def body(carry, micro_batch):
        loss_acc, grads_acc = carry
        (loss, aux), grads = grad_fn(trainable, micro_batch)
        return (loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)), aux

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
    (loss, grads), aux = jax.lax.scan(body, zeros, stacked)
    return loss, grads, aux


def apply_gradients(tx: optax.GradientTransformation, trainable, opt_state, grads):
    """(new trainable, new optimizer state, global gradient norm)."""
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, optax.global_norm(grads)
