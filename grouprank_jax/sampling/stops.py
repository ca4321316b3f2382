"""Stop strings: a device-side early exit plus an exact host-side truncation.

Why two parts: a stop string like ``</answer>`` can come out of the model as many different
token sequences, and text only exists after decoding on the host.
- Device (early exit): each stop string's canonical tokenization (``encode(s)``) is matched
  against the tail of every row inside the decode loop, so the usual case ends the row at once.
- Host (correctness): every completion is decoded; if it contains a stop string, the tokens,
  log-probs and length are cut just after the token that completes the first occurrence, and
  the text just after the stop string itself (the stop string is kept: the reward parser needs
  the closing tag).
Limitation: a stop string produced by a non-canonical tokenization is still cut exactly, but
the row keeps decoding (wasted steps) until a stop id or ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stop_token_sequences(tokenizer, stops: Sequence[str]) -> np.ndarray:
    """``[S, W]`` int32: one row per stop string, right-aligned, left-padded with -1 (wildcard)."""
    if not stops:
        return np.zeros((0, 0), np.int32)
    seqs = [list(tokenizer.encode(s, add_special_tokens=False)) for s in stops]
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        out[i, width - len(s) :] = s
    return out


def _first_stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Character offset just after the earliest-ending stop string in ``text`` (None if absent)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def apply_stop_strings(tokenizer, tokens, logprobs, lengths, stopped, stops: Sequence[str], pad_id: int) -> list[str]:
    """Decode every row; truncate rows at their first stop string (arrays are edited in place).

    tokens [N, M] int32, logprobs [N, M] fp32, lengths [N] int32, stopped [N] bool.
    Returns the texts (special tokens skipped).
    """

    def decode(row, m):
        return tokenizer.decode(tokens[row, :m].tolist(), skip_special_tokens=True)

    texts = []
    for row in range(tokens.shape[0]):
        length = int(lengths[row])
        text = decode(row, length)
        if stops and _first_stop_end(text, stops) is not None:
            # Smallest prefix whose text already holds a stop string (containment grows with the
            # prefix), found with O(log M) decodes instead of one per token.
            lo, hi = 1, length
            while lo < hi:
                mid = (lo + hi) // 2
                if _first_stop_end(decode(row, mid), stops) is not None:
                    hi = mid
                else:
                    lo = mid + 1
            tokens[row, lo:] = pad_id
            logprobs[row, lo:] = 0.0
            lengths[row] = lo
            stopped[row] = True
            text = decode(row, lo)
            text = text[: _first_stop_end(text, stops)]
        texts.append(text)
    return texts
