"""Log-probabilities of chosen tokens without materialising ``[tokens, vocab]`` logits.

The LM head is applied blockwise: a ``lax.scan`` over chunks of ``chunk_size`` tokens computes
each chunk's fp32 logits, its log-sum-exp, the chosen token's log-prob and the entropy, and the
chunk body is rematerialised, so the backward pass also holds one ``[chunk, vocab]`` block at a
time. Peak memory is ``chunk * vocab * 4`` bytes instead of ``tokens * vocab * 4``. When all
tokens fit in one chunk the block is computed once and kept (no remat, no scan).

On a single CPU device (``rowwise_softmax``) the log-sum-exp and the entropy of a block are
reduced one row at a time: XLA:CPU runs an exp fused into a row reduction over the vocabulary
~7x slower once a block holds more than ~128 rows (``softmax_stats_by_row``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grouprank_jax.models.attention import mesh_platform

# Below this many rows XLA:CPU's batched row reduction is as fast as the loop (measured at
# [8, 151936]: 1.0 ms batched, 1.5 ms looped; at 16 rows 2.2 vs 1.6 ms).
CPU_ROWWISE_SOFTMAX_MIN_ROWS = 16


def lm_head_matrix(model) -> jax.Array:
    """The output projection as ``[D, V]`` (the embedding transposed when tied)."""
    if model.cfg.tie_word_embeddings:
        return model.embed[...].T
    return model.lm_head[...]


def rowwise_softmax(mesh) -> bool:
    """Whether the LM head's softmax reductions loop over rows: on a program for one CPU device.

    On TPU/GPU the batched reduction is right, and on a mesh of several devices a loop over a
    row-sharded block would gather the block onto every device.
    """
    return mesh_platform(mesh) == "cpu" and (mesh is None or mesh.devices.size == 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_stats_by_row(logits, with_mean: bool):
    """``(lse [C], mean [C])`` of ``logits [C, V]``: ``log sum exp`` and ``E_p[logits]`` under
    ``p = softmax(logits)`` (so the entropy is ``lse - mean``; zeros unless ``with_mean``).

    Each row is a full reduction inside ``lax.map``: XLA:CPU (its YNNPACK reduce fusion) runs a
    batched exp-and-sum over [C, 151936] ~7x slower from ~256 rows on (C = 512: 319 ms batched,
    49 ms looped on two cores; 128 rows: 18 vs 13 ms) while a row reduced alone stays fast. The
    backward is elementwise, ``dlogits = p * (g_lse + g_mean * (1 + logits - mean))``.
    """
    return _stats_fwd(logits, with_mean)[0]


def _row_stats(row, with_mean: bool):
    top = jnp.max(row)
    weights = jnp.exp(row - top)  # [V]
    total = jnp.sum(weights)
    mean = jnp.sum(weights * row) / total if with_mean else jnp.zeros((), row.dtype)
    return top + jnp.log(total), mean


def _stats_fwd(logits, with_mean):
    lse, mean = jax.lax.map(lambda row: _row_stats(row, with_mean), logits)
    return (lse, mean), (logits, lse, mean)


def _stats_bwd(with_mean, residuals, cotangents):
    logits, lse, mean = residuals
    g_lse, g_mean = cotangents
    coef = g_lse[:, None]  # d lse / d logits = p
    if with_mean:  # d E_p[x] / d x_j = p_j (1 + x_j - E_p[x])
        coef = coef + g_mean[:, None] * (1.0 + logits - mean[:, None])
    return (jnp.exp(logits - lse[:, None]) * coef,)


softmax_stats_by_row.defvjp(_stats_fwd, _stats_bwd)


def _chunk_stats(head, hidden, targets, temperature: float = 1.0, with_entropy: bool = True, rowwise: bool = False):
    # hidden [C, D], targets [C] -> logp [C], entropy [C]
    logits = jnp.dot(hidden.astype(jnp.float32), head.astype(jnp.float32))  # [C, V] fp32
    if temperature != 1.0:
        logits = logits / temperature
    chosen = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    if rowwise and logits.shape[0] >= CPU_ROWWISE_SOFTMAX_MIN_ROWS:
        lse, mean = softmax_stats_by_row(logits, with_entropy)
        return chosen - lse, lse - mean
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[:, None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return chosen - lse, entropy


def token_logprobs(
    head,
    hidden,
    targets,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    temperature: float = 1.0,
    rowwise: bool = False,
):
    """``log p(targets | hidden)`` and the entropy of each position's distribution, both of
    ``softmax(logits / temperature)`` (GRPO's: the distribution rollouts are sampled from).

    head [D, V]; hidden [..., D]; targets [...] int -> (logp [...], entropy [...]) in fp32.
    ``rowwise`` (``rowwise_softmax(mesh)``) reduces each block's softmax one row at a time.
    """
    lead = targets.shape
    d = hidden.shape[-1]
    flat_h = hidden.reshape(-1, d)
    flat_t = targets.reshape(-1).astype(jnp.int32)
    n = flat_t.shape[0]
    if n <= chunk_size:
        # One block: nothing to save by rematerialising it (the backward would hold the same
        # [n, vocab] block), so skip the recompute: 3 instead of 4 LM-head matmuls per step.
        logp, ent = _chunk_stats(head, flat_h, flat_t, temperature, with_entropy, rowwise)
        return logp.reshape(lead), (ent if with_entropy else jnp.zeros_like(ent)).reshape(lead)
    chunk = max(1, min(chunk_size, n))
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    if pad:
        flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
        flat_t = jnp.pad(flat_t, (0, pad))

    @jax.checkpoint
    def body(_, xs):
        h, t = xs
        logp, ent = _chunk_stats(head, h, t, temperature, with_entropy, rowwise)
        return None, (logp, ent if with_entropy else jnp.zeros_like(logp))

    _, (logp, ent) = jax.lax.scan(body, None, (flat_h.reshape(num_chunks, chunk, d), flat_t.reshape(num_chunks, chunk)))
    logp = logp.reshape(-1)[:n].reshape(lead)
    ent = ent.reshape(-1)[:n].reshape(lead)
    return logp, ent


def naive_token_logprobs(head, hidden, targets, temperature: float = 1.0):
    """Reference: full ``[tokens, vocab]`` logits at once (for tests and the memory benchmark)."""
    logits = jnp.einsum("...d,dv->...v", hidden.astype(jnp.float32), head.astype(jnp.float32)) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy
