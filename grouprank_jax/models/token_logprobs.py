"""Log-probabilities of chosen tokens without materialising ``[tokens, vocab]`` logits.

The LM head is applied blockwise: a ``lax.scan`` over chunks of ``chunk_size`` tokens computes
each chunk's fp32 logits, its log-sum-exp, the chosen token's log-prob and the entropy, and the
chunk body is rematerialised, so the backward pass also holds one ``[chunk, vocab]`` block at a
time. Peak memory is ``chunk * vocab * 4`` bytes instead of ``tokens * vocab * 4``. When all
tokens fit in one chunk the block is computed once and kept (no remat, no scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_head_matrix(model) -> jax.Array:
    """The output projection as ``[D, V]`` (the embedding transposed when tied)."""
    if model.cfg.tie_word_embeddings:
        return model.embed[...].T
    return model.lm_head[...]


def _chunk_stats(head, hidden, targets, temperature: float = 1.0):
    # hidden [C, D], targets [C] -> logp [C], entropy [C]
    logits = jnp.dot(hidden.astype(jnp.float32), head.astype(jnp.float32))  # [C, V] fp32
    if temperature != 1.0:
        logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return chosen - lse, entropy


def token_logprobs(head, hidden, targets, chunk_size: int = 1024, with_entropy: bool = True, temperature: float = 1.0):
    """``log p(targets | hidden)`` and the entropy of each position's distribution, both of
    ``softmax(logits / temperature)`` (GRPO's: the distribution rollouts are sampled from).

    head [D, V]; hidden [..., D]; targets [...] int -> (logp [...], entropy [...]) in fp32.
    """
    lead = targets.shape
    d = hidden.shape[-1]
    flat_h = hidden.reshape(-1, d)
    flat_t = targets.reshape(-1).astype(jnp.int32)
    n = flat_t.shape[0]
    if n <= chunk_size:
        # One block: nothing to save by rematerialising it (the backward would hold the same
        # [n, vocab] block), so skip the recompute: 3 instead of 4 LM-head matmuls per step.
        logp, ent = _chunk_stats(head, flat_h, flat_t, temperature)
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
        logp, ent = _chunk_stats(head, h, t, temperature)
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
