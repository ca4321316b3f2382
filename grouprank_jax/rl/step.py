"""Jitted GRPO pieces: completion log-probs of prompt+completion rows (blockwise LM head) and
the policy update on one mini-batch.

Row layout: ``seq_ids [R, P + C]`` = a left-padded prompt (P) followed by the completion (C,
right-padded); ``seq_mask`` marks real tokens. Completion token j sits at index P + j and is
predicted from the hidden state at P + j - 1.

Two layouts compute the same log-probs (``GRPOConfig.shared_prefix``):
- per-rollout (``rollouts=None``): every row runs its whole ``[P + C]`` sequence, so each prompt
  is recomputed G times (the oracle);
- shared-prefix (``rollouts=G``): rows are prompt-major (row b*G + j = rollout j of prompt b);
  each prompt's forward runs once (``collect_kv``) and its G responses attend to that KV plus
  their own causal keys (``models/prefix_attention.py``); the prompt's gradient is the sum of its
  G rollouts' by autodiff. Compute per prompt: P + G*C tokens instead of G*(P + C).

Micro-batches (``micro_rows``) are strided, not contiguous: per-rollout, micro-batch j holds rows
``j, j + M, j + 2M, ...`` (M = R / micro_rows); shared-prefix, it holds prompts j, j + M', ...
with all G rollouts of each (a prompt's forward is shared only within a micro-batch). Rows arrive
sharded in contiguous blocks over the batch axes, so a strided split gives every device its share
of every micro-batch without moving a row; a contiguous split would put a whole micro-batch on a
few devices. Shared-prefix passes need a multiple of (batch shards) prompts: a prompt batch the
batch axes do not divide is replicated, every chip running every prompt forward of the pass
(``grouprank plan`` warns). Metrics are combined by token counts, so they do not depend on the split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grouprank_jax.models.token_logprobs import lm_head_matrix, rowwise_softmax, token_logprobs
from grouprank_jax.rl.losses import grpo_loss, masked_mean
from grouprank_jax.training.accumulate import apply_gradients, sum_gradients
from grouprank_jax.training.state import make_optimizer


def make_grpo_optimizer(grpo, total_updates: int) -> optax.GradientTransformation:
    """AdamW as ``GRPOConfig`` sets it (verl's actor defaults: weight decay 0.01, global-norm
    clip 1.0, constant LR); shared by the trainer and ``grouprank compile``."""
    per_step = grpo.updates_per_rollout_batch
    return make_optimizer(
        grpo.learning_rate,
        total_updates,
        warmup_steps=grpo.lr_warmup_steps * per_step,
        weight_decay=grpo.weight_decay,
        max_grad_norm=grpo.max_grad_norm,
        min_lr_ratio=grpo.min_lr_ratio,
        schedule=grpo.lr_schedule,
    )


def split_micro(x, micro_rows: int):
    """``[R, ...] -> [R / micro_rows, micro_rows, ...]``, micro-batch j = rows j, j + M, ..."""
    rows = x.shape[0]
    return x.reshape(micro_rows, rows // micro_rows, *x.shape[1:]).swapaxes(0, 1)


def merge_micro(x):
    """Inverse of ``split_micro``."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _micro_size(rows: int, micro_rows: int | None, rollouts: int | None = None) -> int:
    micro = rows if not micro_rows or micro_rows >= rows else micro_rows
    if rows % micro:
        raise ValueError(f"a mini-batch of {rows} rows is not a multiple of grpo.micro_batch_rows={micro}")
    if rollouts and micro % rollouts:
        raise ValueError(
            f"grpo.micro_batch_rows={micro} must hold whole prompts (a multiple of rollouts_per_prompt={rollouts}) "
            "with grpo.shared_prefix"
        )
    return micro


def _splitter(micro: int, rollouts: int | None):
    """(split, merge) of rows into micro-batches: strided over rows, or over whole prompts."""
    if not rollouts:
        return (lambda x: split_micro(x, micro)), merge_micro

    def split(x):  # [R, ...] -> [R / micro, micro, ...], prompts strided, rollouts kept together
        by_prompt = x.reshape(x.shape[0] // rollouts, rollouts, *x.shape[1:])
        parts = split_micro(by_prompt, micro // rollouts)  # [n, micro / G, G, ...]
        return parts.reshape(parts.shape[0], micro, *x.shape[1:])

    def merge(x):  # inverse of split
        by_prompt = x.reshape(x.shape[0], micro // rollouts, rollouts, *x.shape[2:])
        return merge_micro(by_prompt).reshape(-1, *x.shape[2:])

    return split, merge


def completion_logprobs(
    trainable,
    frozen,
    graphdef,
    seq_ids,
    seq_mask,
    prompt_len: int,
    chunk_size: int,
    use_lora: bool = True,
    with_entropy: bool = True,
    rollouts: int | None = None,
    temperature: float = 1.0,
):
    """(logp, entropy), each [R, C] fp32, of the completion tokens under the given weights, of
    ``softmax(logits / temperature)`` (the rollouts' sampling temperature, as TRL and verl);
    ``rollouts=G`` computes each prompt once (the shared-prefix layout, module docstring)."""
    model = nnx.merge(graphdef, trainable, frozen)
    targets = seq_ids[:, prompt_len:]  # [R, C]
    if not rollouts:
        hidden = model(seq_ids, attention_mask=seq_mask, return_hidden=True, use_lora=use_lora)  # [R, P+C, D]
        predicting = hidden[:, prompt_len - 1 : -1]  # [R, C, D]
    else:
        r, c = targets.shape
        first_rollout = lambda x: x.reshape(r // rollouts, rollouts, -1)[:, 0, :prompt_len]  # [B, P]
        prompt_ids, prompt_mask = first_rollout(seq_ids), first_rollout(seq_mask)
        prompt_hidden, prefix = model(
            prompt_ids, attention_mask=prompt_mask, return_hidden=True, use_lora=use_lora, collect_kv=True
        )  # [B, P, D], per layer [B, K, P, H]
        # a response continues its prompt's positions (prompts are left-padded: their length)
        start = jnp.repeat(jnp.sum(prompt_mask.astype(jnp.int32), axis=1), rollouts)  # [R]
        positions = start[:, None] + jnp.arange(c, dtype=jnp.int32)  # [R, C]
        hidden = model(
            targets,
            attention_mask=seq_mask[:, prompt_len:],
            positions=positions,
            return_hidden=True,
            use_lora=use_lora,
            prefix=prefix,
        )  # [R, C, D]
        # token 0 of every rollout is predicted by its prompt's last position (shared)
        last_prompt = jnp.repeat(prompt_hidden[:, -1:], rollouts, axis=0)  # [R, 1, D]
        predicting = jnp.concatenate([last_prompt, hidden[:, :-1]], axis=1)  # [R, C, D]
    head = lm_head_matrix(model)
    rowwise = rowwise_softmax(model.mesh)
    return token_logprobs(head, predicting, targets, chunk_size, with_entropy, temperature, rowwise)


def make_logprob_fn(
    graphdef,
    prompt_len: int,
    chunk_size: int,
    use_lora: bool,
    micro_rows: int | None = None,
    compiler_options: dict | None = None,
    rollouts: int | None = None,
    temperature: float = 1.0,
):
    """Jitted no-grad log-probs [R, C] (the reference policy's, or the current policy's for
    checks), ``micro_rows`` rows per forward pass; ``rollouts=G``: the shared-prefix layout;
    ``temperature``: the rollouts' sampling temperature (``completion_logprobs``)."""

    def fn(trainable, frozen, seq_ids, seq_mask):
        micro = _micro_size(seq_ids.shape[0], micro_rows, rollouts)
        split, merge = _splitter(micro, rollouts)

        def one(_, rows):
            ids, mask = rows
            logp, _ = completion_logprobs(
                trainable,
                frozen,
                graphdef,
                ids,
                mask,
                prompt_len,
                chunk_size,
                use_lora=use_lora,
                with_entropy=False,
                rollouts=rollouts,
                temperature=temperature,
            )
            return None, logp

        if micro == seq_ids.shape[0]:
            return one(None, (seq_ids, seq_mask))[1]
        _, logp = jax.lax.scan(one, None, (split(seq_ids), split(seq_mask)))
        return merge(logp)

    return jax.jit(fn, compiler_options=compiler_options or None)


def make_grpo_update(
    graphdef,
    tx: optax.GradientTransformation,
    loss_kwargs: dict,
    prompt_len: int,
    chunk_size: int,
    donate: bool = True,
    micro_rows: int | None = None,
    compiler_options: dict | None = None,
    rollouts: int | None = None,
    temperature: float = 1.0,
):
    """``update(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)``.

    ``batch``: seq_ids/seq_mask [R, P+C]; completion_mask, old_logp, ref_logp [R, C];
    advantages [R]. ``old_logp`` are the sampler's fp32 log-probs, so on the first update of a
    rollout batch the ratio is 1 up to sampler/trainer numerics (logged as ``logprob_drift``).
    ``micro_rows`` splits the mini-batch into forward/backward passes of that many rows whose
    gradients are summed; each pass divides by the WHOLE mini-batch's count (tokens for
    token-mean, sequences otherwise), so the update equals the unsplit one. ``rollouts=G``: the
    shared-prefix layout (rows prompt-major, micro-batches of whole prompts). ``temperature``:
    the rollouts' sampling temperature; log-probs, ratio, KL and entropy are of
    ``softmax(logits / temperature)``, as TRL and verl compute them (the sampler's ``old_logp``
    must come from ``SamplingParams(tempered_logprobs=True)``).
    """
    agg_mode = loss_kwargs.get("loss_agg_mode", "token-mean")

    def loss_fn(trainable, frozen, batch, denom):
        logp, entropy = completion_logprobs(
            trainable,
            frozen,
            graphdef,
            batch["seq_ids"],
            batch["seq_mask"],
            prompt_len,
            chunk_size,
            rollouts=rollouts,
            temperature=temperature,
        )
        mask = batch["completion_mask"].astype(jnp.float32)
        loss, metrics = grpo_loss(
            logp,
            batch["old_logp"],
            batch.get("ref_logp"),
            batch["advantages"],
            mask,
            entropies=entropy,
            denom=denom,
            **loss_kwargs,
        )
        metrics["logprob_drift"] = masked_mean(jnp.abs(jax.lax.stop_gradient(logp) - batch["old_logp"]), mask)
        metrics["_tokens"] = jnp.sum(mask)
        return loss, metrics

    def update(trainable, frozen, opt_state, batch):
        rows = batch["seq_ids"].shape[0]
        micro = _micro_size(rows, micro_rows, rollouts)
        mask = batch["completion_mask"].astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(mask), 1.0) if agg_mode == "token-mean" else jnp.float32(rows)
        split, _ = _splitter(micro, rollouts)
        stacked = jax.tree.map(split, batch)  # [rows / micro, micro, ...]
        _, grads, metrics = sum_gradients(lambda t, mb: loss_fn(t, frozen, mb, denom), trainable, stacked)
        metrics = _combine_micro_metrics(metrics)
        trainable, opt_state, metrics["grad_norm"] = apply_gradients(tx, trainable, opt_state, grads)
        return trainable, opt_state, metrics

    return jax.jit(update, donate_argnums=(0, 2) if donate else (), compiler_options=compiler_options or None)


def _combine_micro_metrics(metrics: dict) -> dict:
    """Per-micro-batch metrics [M] -> the mini-batch's: sums for the loss terms (each already
    divided by the global count), the max for maxima, row means for per-row values, and token-
    weighted means for the token means, so no metric depends on how the rows were split."""
    tokens = metrics.pop("_tokens")  # [M]
    weights = tokens / jnp.maximum(jnp.sum(tokens), 1.0)
    combined = {}
    for key, value in metrics.items():
        if key in ("loss", "pg_loss", "kl_loss"):
            combined[key] = jnp.sum(value)
        elif key == "ratio_max":
            combined[key] = jnp.max(value)
        elif key == "response_len_mean":
            combined[key] = jnp.mean(value)  # equal-sized micro-batches: the mean of row means
        else:
            combined[key] = jnp.sum(value * weights)
    return combined
