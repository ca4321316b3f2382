"""One decode step's bookkeeping, as pure functions of the loop state (jitted inside the Sampler).

A step turns the rows' next-token logits into a sampled token, its log-prob (under the plain
softmax, or at the sampling temperature: ``SamplingParams.tempered_logprobs``), and the per-row
state that decides when a row is done: a stop id, a stop token sequence, or ``max_new`` tokens.
Finished rows stop changing (pad token, log-prob 0, length frozen), so the loop can run until
every row is done.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grouprank_jax.sampling import ops


class RowRecord(NamedTuple):
    """The decode loop's per-row outputs and stop state (a pytree carried by ``while_loop``)."""

    tokens: jax.Array  # [rows, max_new] int32: sampled ids, the pad id after a row's end
    logprobs: jax.Array  # [rows, max_new] fp32: log-prob of each sampled id, 0 after the end
    done: jax.Array  # [rows] bool
    lengths: jax.Array  # [rows] int32: tokens generated, the stop id / sequence included
    stopped: jax.Array  # [rows] bool: ended by a stop id or sequence (not by the length limit)
    recent: jax.Array  # [rows, window] int32: the last tokens, for stop-sequence matching

    @classmethod
    def start(cls, live, max_new: int, window: int, pad_id: int) -> RowRecord:
        """Empty records for ``live [rows]`` rows; rows with ``live`` False (batch padding) start done."""
        rows = live.shape[0]
        return cls(
            tokens=jnp.full((rows, max_new), pad_id, jnp.int32),
            logprobs=jnp.zeros((rows, max_new), jnp.float32),
            done=~live,
            lengths=jnp.zeros((rows,), jnp.int32),
            stopped=jnp.zeros((rows,), bool),
            recent=jnp.full((rows, max(1, window)), -2, jnp.int32),  # -2 matches no stop sequence
        )


def record_step(
    step,
    logits,
    rec: RowRecord,
    *,
    row_seeds,
    row_ids,
    temperature,
    top_p,
    logprob_temperature,
    stop_ids,
    stop_seqs,
    pad_id: int,
    max_new: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
) -> tuple[jax.Array, RowRecord]:
    """Sample from ``logits [rows, V]`` at ``step`` and record it -> (token to feed back [rows], record).

    ``row_seeds``, ``row_ids [rows]`` (``batch.row_streams``) and ``step`` pick each row's random
    stream, so what a row samples does not depend on the batch it is in or on the mesh.
    """
    keys = ops.row_keys(row_seeds, row_ids, step)
    if greedy:
        tok, lp = ops.greedy_tokens_and_logprobs(logits, logprob_temperature)
    else:
        tok = ops.sample_tokens(logits, keys, temperature, top_p, greedy=False, top_k=top_k, use_top_p=use_top_p)
        lp = ops.token_logprobs(logits, tok, logprob_temperature)
    active = ~rec.done
    tok = jnp.where(active, tok, pad_id)
    lp = jnp.where(active, lp, 0.0)
    recent = jnp.concatenate([rec.recent[:, 1:], tok[:, None]], axis=1)
    ended = active & (jnp.isin(tok, stop_ids) | ops.match_stop_sequences(recent, stop_seqs))
    rec = RowRecord(
        tokens=jax.lax.dynamic_update_slice_in_dim(rec.tokens, tok[:, None], step, axis=1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(rec.logprobs, lp[:, None], step, axis=1),
        done=rec.done | ended | (step + 1 >= max_new),
        lengths=rec.lengths + active.astype(jnp.int32),
        stopped=rec.stopped | ended,
        recent=recent,
    )
    # Finished rows feed id 0 back, since the pad id need not be inside the vocabulary (an
    # out-of-range embedding lookup yields NaN).
    return jnp.where(active, tok, 0), rec
