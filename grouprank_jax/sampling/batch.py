"""Host-side batch layout of a ``generate`` call: shape buckets, left padding, random-stream rows.

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
