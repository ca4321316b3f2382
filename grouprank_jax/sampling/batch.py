"""Host-side batch layout of a ``generate`` call: shape buckets, left padding, random streams.

Pure numpy, so the layout rules (which shapes compile, which global row a rollout is) are
testable without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prompt_buckets(max_prompt_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two >= ``smallest`` below ``max_prompt_len``, then ``max_prompt_len`` itself."""
    out, b = [], smallest
    while b < max_prompt_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_prompt_len,)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def batch_bucket(num_prompts: int, multiple: int) -> int:
    """The batch a call of ``num_prompts`` prompts compiles for: the next power of two, rounded
    up to a multiple of the mesh's batch shards (the sampler's and the planner's rule)."""
    return -(-next_pow2(num_prompts) // multiple) * multiple


def left_pad(encoded: Sequence[Sequence[int]], batch: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (ids, mask) ``[batch, length]`` int32 and prompt lengths ``[batch]``.

    Left padding with id 0 (masked out: the pad id may lie outside the vocabulary) puts every
    prompt's last token at ``length - 1``. Dummy rows (after the real prompts) hold one visible
    token so that no row is entirely masked.
    """
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    mask[len(encoded) :, -1] = 1
    lens = np.ones((batch,), np.int32)
    for i, p in enumerate(encoded):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
        lens[i] = len(p)
    return ids, mask, lens


def global_row_ids(num: int, batch: int, n: int, process: int, processes: int) -> np.ndarray:
    """``[batch * n]`` int32: the global number of each rollout row, which picks its random stream.

    Real prompts of all processes come first (in process order), then every process's dummy rows,
    so what a prompt's rollouts sample depends neither on the process count nor on the padding.
    """
    prompt_ids = np.concatenate(
        [process * num + np.arange(num), processes * num + process * (batch - num) + np.arange(batch - num)]
    )
    return (prompt_ids[:, None] * n + np.arange(n)[None, :]).reshape(-1).astype(np.int32)


def row_streams(
    seed: int,
    num: int,
    batch: int,
    n: int,
    process: int,
    processes: int,
    streams: Sequence[tuple[int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (seeds ``[batch * n]`` uint32, row ids ``[batch * n]`` int32): each rollout row's random
    stream, the key ``fold_in(fold_in(key(seed), row_id), step)``.

    Default: every row takes the call's ``seed`` and its global row number (``global_row_ids``).
    ``streams`` gives each of the ``num`` real prompts its own ``(seed, index)``; its rollout j
    draws from ``(seed, index * n + j)``. Callers that split one logical request into several
    calls, or merge several requests into one, pass the prompt's index in its own request, so a
    sample depends only on (request seed, prompt index, n), never on chunking or batch-mates.
    Dummy rows keep the default stream (their output is dropped).
    """
    seeds = np.full((batch * n,), seed % 2**32, np.uint32)
    row_ids = global_row_ids(num, batch, n, process, processes)
    if streams is None:
        return seeds, row_ids
    if len(streams) != num:
        raise ValueError(f"streams has {len(streams)} entries for {num} prompts")
    for k, (s, index) in enumerate(streams):
        if not 0 <= index <= (2**31 - 1) // n - 1:
            raise ValueError(f"streams[{k}]: prompt index {index} is outside [0, 2**31 / n) for n={n}")
        seeds[k * n : (k + 1) * n] = int(s) % 2**32
        row_ids[k * n : (k + 1) * n] = index * n + np.arange(n)
    return seeds, row_ids
