"""The jitted SFT step: masked next-token cross-entropy with a blockwise LM head, gradient
accumulation over micro-batches (exact token-mean over the whole step) and the optax update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from grouprank_jax.models.token_logprobs import lm_head_matrix, rowwise_softmax, token_logprobs
from grouprank_jax.training.accumulate import apply_gradients, sum_gradients
from grouprank_jax.training.state import make_optimizer


def make_sft_optimizer(sft, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay as ``SFTConfig`` sets it (the trainer and
    ``grouprank compile`` build the same optimizer, so the compiled step is the trained one)."""
    return make_optimizer(
        sft.learning_rate,
        total_steps,
        warmup_steps=int(sft.warmup_ratio * total_steps),
        weight_decay=sft.weight_decay,
        b1=sft.adam_b1,
        b2=sft.adam_b2,
        eps=sft.adam_eps,
        max_grad_norm=sft.max_grad_norm,
        min_lr_ratio=sft.min_lr_ratio,
    )


def loss_rows_bucket(loss_mask, multiple: int = 16) -> int:
    """Host-side: a bound on loss tokens per row, rounded up to ``multiple`` (a static shape for
    the step; targets of one task have similar lengths, so few shapes compile)."""
    longest = int(np.asarray(loss_mask).reshape(-1, loss_mask.shape[-1]).sum(-1).max())
    return min(-(-max(longest, 1) // multiple) * multiple, loss_mask.shape[-1])


def sft_loss_sums(trainable, frozen, graphdef, batch, chunk_size: int, loss_tokens_per_row: int | None = None):
    """(sum of token NLL over the loss mask, number of loss tokens) for one micro-batch.

    ``batch``: input_ids/targets/loss_mask/segment_ids/positions ``[B, T]``; ``targets[t]`` is
    the token after ``input_ids[t]`` and ``loss_mask[t]`` marks assistant-target positions.
    With ``loss_tokens_per_row`` = K (>= every row's loss tokens), only the K loss positions of
    each row reach the LM head: prompts never pay for the 152k-wide projection.
    """
    model = nnx.merge(graphdef, trainable, frozen)
    hidden = model(
        batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"], return_hidden=True
    )  # [B, T, D]
    mask = batch["loss_mask"].astype(jnp.int32)
    targets = batch["targets"]
    if loss_tokens_per_row is not None and loss_tokens_per_row < mask.shape[1]:
        # Stable sort puts each row's loss positions first, in order; keep the first K.
        idx = jnp.argsort(-mask, axis=1, stable=True)[:, :loss_tokens_per_row]  # [B, K]
        hidden = jnp.take_along_axis(hidden, idx[..., None], axis=1)  # [B, K, D]
        targets = jnp.take_along_axis(targets, idx, axis=1)
        mask = jnp.take_along_axis(mask, idx, axis=1)
    logp, _ = token_logprobs(
        lm_head_matrix(model), hidden, targets, chunk_size, with_entropy=False, rowwise=rowwise_softmax(model.mesh)
    )
    mask = mask.astype(jnp.float32)
    return -jnp.sum(logp * mask), jnp.sum(mask)


def make_sft_step(
    graphdef,
    tx: optax.GradientTransformation,
    chunk_size: int = 1024,
    donate: bool = True,
    compiler_options: dict | None = None,
):
    """``step(trainable, frozen, opt_state, batch, loss_tokens_per_row=None) -> (trainable, opt_state, metrics)``.

    ``batch`` leaves are ``[accum, micro_batch, T]``: gradients of the summed loss accumulate over
    the leading axis and one division by the step's total loss tokens gives the exact token mean.
    """

    def step(trainable, frozen, opt_state, batch, loss_tokens_per_row=None):
        def loss_fn(t, micro_batch):
            return sft_loss_sums(t, frozen, graphdef, micro_batch, chunk_size, loss_tokens_per_row)

        loss_sum, grads, tokens = sum_gradients(loss_fn, trainable, batch)
        denom = jnp.maximum(jnp.sum(tokens), 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        trainable, opt_state, grad_norm = apply_gradients(tx, trainable, opt_state, grads)
        return trainable, opt_state, {"loss": loss_sum / denom, "grad_norm": grad_norm, "loss_tokens": jnp.sum(tokens)}

    return jax.jit(
        step,
        donate_argnums=(0, 2) if donate else (),
        static_argnames=("loss_tokens_per_row",),
        compiler_options=compiler_options or None,
    )
