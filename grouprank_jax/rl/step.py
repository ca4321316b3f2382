"""Jitted GRPO pieces: completion log-probs of prompt+completion rows (blockwise LM head) and
the policy update on one mini-batch.

Row layout: ``seq_ids [R, P + C]`` = a left-padded prompt (P) followed by the completion (C,
right-padded); ``seq_mask`` marks real tokens. Completion token j sits at index P + j and is
predicted from the hidden state at P + j - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grouprank_jax.models.token_logprobs import lm_head_matrix, token_logprobs
from grouprank_jax.rl.losses import grpo_loss, masked_mean


def completion_logprobs(trainable, frozen, graphdef, seq_ids, seq_mask, prompt_len: int, chunk_size: int,
                        use_lora: bool = True, with_entropy: bool = True):
    """(logp, entropy), each [R, C] fp32, of the completion tokens under the given weights."""
    model = nnx.merge(graphdef, trainable, frozen)
    hidden = model(seq_ids, attention_mask=seq_mask, return_hidden=True, use_lora=use_lora)  # [R, P+C, D]
    predicting = hidden[:, prompt_len - 1 : -1]  # [R, C, D]
    targets = seq_ids[:, prompt_len:]  # [R, C]
    return token_logprobs(lm_head_matrix(model), predicting, targets, chunk_size, with_entropy)


def make_logprob_fn(graphdef, prompt_len: int, chunk_size: int, use_lora: bool):
    """Jitted no-grad log-probs (the reference policy's, or the current policy's for checks)."""

    def fn(trainable, frozen, seq_ids, seq_mask):
        logp, _ = completion_logprobs(trainable, frozen, graphdef, seq_ids, seq_mask, prompt_len, chunk_size,
                                      use_lora=use_lora, with_entropy=False)
        return logp

    return jax.jit(fn)


def make_grpo_update(graphdef, tx: optax.GradientTransformation, loss_kwargs: dict, prompt_len: int,
                     chunk_size: int, donate: bool = True, micro_rows: int | None = None):
    """``update(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)``.

    ``batch``: seq_ids/seq_mask [R, P+C]; completion_mask, old_logp, ref_logp [R, C];
    advantages [R]. ``old_logp`` are the sampler's fp32 log-probs, so on the first update of a
    rollout batch the ratio is 1 up to sampler/trainer numerics (logged as ``logprob_drift``).
    ``micro_rows`` splits the mini-batch into forward/backward passes of that many rows whose
    gradients are summed; each pass divides by the WHOLE mini-batch's count (tokens for
    token-mean, sequences otherwise), so the update equals the unsplit one.
    """
    agg_mode = loss_kwargs.get("loss_agg_mode", "token-mean")

    def loss_fn(trainable, frozen, batch, denom):
        logp, entropy = completion_logprobs(trainable, frozen, graphdef, batch["seq_ids"], batch["seq_mask"],
                                            prompt_len, chunk_size)
        mask = batch["completion_mask"].astype(jnp.float32)
        loss, metrics = grpo_loss(logp, batch["old_logp"], batch.get("ref_logp"), batch["advantages"], mask,
                                  entropies=entropy, denom=denom, **loss_kwargs)
        metrics["logprob_drift"] = masked_mean(jnp.abs(jax.lax.stop_gradient(logp) - batch["old_logp"]), mask)
        return loss, metrics

    def update(trainable, frozen, opt_state, batch):
        rows = batch["seq_ids"].shape[0]
        micro = rows if not micro_rows or micro_rows >= rows else micro_rows
        if rows % micro:
            raise ValueError(f"mini-batch of {rows} rows is not a multiple of micro_rows={micro}")
        mask = batch["completion_mask"].astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(mask), 1.0) if agg_mode == "token-mean" else jnp.float32(rows)
        stacked = jax.tree.map(lambda x: x.reshape(rows // micro, micro, *x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(grads_acc, mb):
            (_, metrics), grads = grad_fn(trainable, frozen, mb, denom)
            return jax.tree.map(jnp.add, grads_acc, grads), metrics

        grads, metrics = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable), stacked)
        # per-micro metrics: sums for the loss terms (each already divided by the global count),
        # means for rates and ratios
        metrics = {k: (jnp.sum(v) if k in ("loss", "pg_loss", "kl_loss") else jnp.mean(v)) for k, v in metrics.items()}
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return trainable, opt_state, metrics

    return jax.jit(update, donate_argnums=(0, 2) if donate else ())
