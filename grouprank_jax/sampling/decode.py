"""One decode step's bookkeeping, as pure functions of the loop state (jitted inside the Sampler).

A step turns the rows' next-token logits into a sampled token, its log-prob (under the plain
softmax, or at the sampling temperature: ``SamplingParams.tempered_logprobs``), and the per-row
state that decides when a row is done: a stop id, a stop token sequence, or ``max_new`` tokens.
Finished rows stop changing (pad token, log-prob 0, length frozen), so the loop can run until
every row is done.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from grouprank_jax.models.token_logprobs import rowwise_softmax
from grouprank_jax.sampling import ops

# From this many rows on, a decode step on one CPU device samples each row on its own (a loop over
# rows: every reduction over the vocabulary is then a full one). XLA:CPU's batched row reductions
# over the 151,936-token vocabulary slow down beyond a few dozen rows (as in the training head,
# models/token_logprobs.py). Whole decode steps, batched -> by rows, in one process (demo model,
# 4 layers of width 64, 2026-12-05): 48 rows at T = 1 26.4 -> 24.4 ms, greedy 32 rows 18.2 ->
# 15.5, top-p 32 rows 117.5 -> 68.7. Below 32 rows the loop loses (LM head + sampling alone,
# 16 rows at T = 1: 6.4 -> 8.1 ms).
CPU_BY_ROW_MIN_ROWS = 32


def vocab_by_row(mesh, rows: int) -> bool:
    """Whether a decode step's sampling and log-probs loop over its ``rows``: on one CPU device,
    from ``CPU_BY_ROW_MIN_ROWS`` rows on (TPU/GPU and multi-device meshes keep the batched ops)."""
    return rows >= CPU_BY_ROW_MIN_ROWS and rowwise_softmax(mesh)


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
    by_row: bool = False,
) -> tuple[jax.Array, RowRecord]:
    """Sample from ``logits [rows, V]`` at ``step`` and record it -> (token to feed back [rows], record).

    ``row_seeds``, ``row_ids [rows]`` (``batch.row_streams``) and ``step`` pick each row's random
    stream, so what a row samples does not depend on the batch it is in or on the mesh.
    ``by_row`` (``vocab_by_row``): the same ops, applied to one row at a time.
    """
    keys = ops.row_keys(row_seeds, row_ids, step)
    pick = functools.partial(
        _pick_tokens,
        temperature=temperature,
        top_p=top_p,
        logprob_temperature=logprob_temperature,
        greedy=greedy,
        top_k=top_k,
        use_top_p=use_top_p,
    )
    if by_row:

        def one_row(row):  # ([V], key) -> (token, log-prob), through the batched ops at 1 row
            tok, lp = pick(row[0][None], row[1][None])
            return tok[0], lp[0]

        tok, lp = jax.lax.map(one_row, (logits, keys))
    else:
        tok, lp = pick(logits, keys)
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


def _pick_tokens(logits, keys, *, temperature, top_p, logprob_temperature, greedy, top_k, use_top_p):
    """(token [rows], its log-prob [rows]) from ``logits [rows, V]`` with ``keys [rows]``."""
    if greedy:
        return ops.greedy_tokens_and_logprobs(logits, logprob_temperature)
    tok = ops.sample_tokens(logits, keys, temperature, top_p, greedy=False, top_k=top_k, use_top_p=use_top_p)
    return tok, ops.token_logprobs(logits, tok, logprob_temperature)
