"""Model output text -> per-document scores, validity and a format status. Never raises.

Two independent questions are answered for every output:

1. **Tags** (``tags_ok``, decides the RL format reward): after stripping surrounding whitespace,
   the text must be exactly ``<reason>…</reason>`` + optional whitespace + ``<answer>…</answer>``:
   it starts with ``<reason>``, ends with ``</answer>``, each of the four tags occurs exactly
   once, in that order, with only whitespace between ``</reason>`` and ``<answer>``. (Equivalent
   to ``re.fullmatch(r"\\s*<reason>.*?</reason>\\s*<answer>.*?</answer>\\s*", text, re.DOTALL)``
   plus "each tag once".) A sampler that strips the ``</answer>`` stop string must re-append it.
2. **JSON** (``json_ok``, decides whether a group has scores), following the official inference
   parser (paper-notes §1): take the text inside the first ``<answer>…</answer>`` if present,
   else the whole text; inside it the last ```` ```json … ``` ```` block, else the last
   ``{…}`` (shortest match, as ``re.findall(r"\\{[\\s\\S]*?\\}")``); repair ``"[7]]"`` -> ``"[7]"``;
   append ``}`` while ``{`` outnumber ``}``; collapse whitespace runs; ``json.loads``. It is ok
   when that yields a JSON object (dict).

``format_status``: 0 = tags ok and JSON ok, 1 = tags ok but JSON not ok, 2 = tags not ok (JSON
may still be ok, and then the scores are still filled in: inference uses them, as the official
parser does not look at the tags).

Per-key rules (documented choices):

- keys ``"[k]"`` and bare ``"k"`` (optionally padded by spaces) name document k, 1-based;
  any other key (``"[k"`` and ``"k]"`` included) is ignored;
- ids outside ``1..group_size`` are ignored; the document count never changes;
- duplicate ids: the LAST occurrence in the text wins (``json.loads`` semantics for identical
  keys, extended to ``"[1]"`` vs ``"1"``);
- values must be JSON numbers equal to an integer in 0..10: ``7`` and ``7.0`` are accepted,
  ``7.5``, ``11``, ``-1``, ``true``, ``"7"``, ``null``, NaN and infinities make that document
  invalid (no clipping: an out-of-scale score is a model error, not a rounding question);
- documents without an accepted value get ``valid=False`` and score 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MAX_SCORE = 10  # the 0..10 scale of the prompt (paper-notes §1)
STATUS_OK, STATUS_BAD_JSON, STATUS_BAD_TAGS = 0, 1, 2

_KEY = re.compile(r"\s*(?:\[\s*(\d{1,9})\s*\]|(\d{1,9}))\s*")  # "[k]" or "k"; not "[k" or "k]"
_BRACKET_REPAIR = re.compile(r"(\[\d+\])\]")
_WHITESPACE = re.compile(r"\s+")


class ParsedOutput(NamedTuple):
    scores: np.ndarray  # [c] float32, 0 where not valid
    valid: np.ndarray  # [c] bool
    format_status: int  # 0 ok, 1 tags ok + JSON bad, 2 tags bad
    json_ok: bool  # a JSON object was recovered (scores usable at inference)
    reason: str  # short human-readable diagnosis for logs


def tags_ok(text: str) -> bool:
    body = text.strip()
    tags = ("<reason>", "</reason>", "<answer>", "</answer>")
    if any(body.count(t) != 1 for t in tags):
        return False
    r_open, r_close, a_open, a_close = (body.find(t) for t in tags)
    return (
        r_open == 0
        and r_open < r_close < a_open < a_close
        and a_close + len("</answer>") == len(body)
        and body[r_close + len("</reason>") : a_open].strip() == ""
    )


def _last_block(text: str, opener: str, closer: str) -> str | None:
    """The last non-overlapping ``opener…closer`` match scanning left to right, shortest body.

    Same result as ``re.findall(opener + "(.*?)" + closer)[-1]`` (DOTALL) but linear time:
    the regex is quadratic on adversarial inputs such as thousands of unmatched ``{``.
    """
    found, pos = None, 0
    while True:
        start = text.find(opener, pos)
        if start < 0:
            return found
        end = text.find(closer, start + len(opener))
        if end < 0:
            return found
        found, pos = text[start : end + len(closer)], end + len(closer)


def extract_json_text(text: str) -> str | None:
    """The candidate JSON string per the official inference parser, or None."""
    start = text.find("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        if end >= 0:
            text = text[start + len("<answer>") : end]
    block = _last_block(text, "```json", "```")
    if block is not None:
        candidate = block[len("```json") : -3]
    else:
        candidate = _last_block(text, "{", "}")
        if candidate is None:
            return None
    candidate = _BRACKET_REPAIR.sub(r"\1", candidate)
    missing = candidate.count("{") - candidate.count("}")
    if missing > 0:
        candidate += "}" * missing
    return _WHITESPACE.sub(" ", candidate).strip()


def _as_score(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        score = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        score = int(value)
    else:
        return None
    return score if 0 <= score <= MAX_SCORE else None


class _ObjectPairs(list):
    """Marks a decoded JSON object (kept as ordered pairs) apart from a decoded JSON array."""


def _parse_json_object(candidate: str) -> list[tuple[str, object]] | None:
    try:
        pairs = json.loads(candidate, object_pairs_hook=_ObjectPairs)
    except (ValueError, RecursionError):  # JSONDecodeError and oversized ints are ValueErrors
        return None
    return pairs if isinstance(pairs, _ObjectPairs) else None


def parse_group_output(text: str, group_size: int) -> ParsedOutput:
    """Scores for the ``group_size`` documents of one group from one completion."""
    scores = np.zeros((max(group_size, 0),), np.float32)  # [c]
    valid = np.zeros((max(group_size, 0),), bool)  # [c]
    if not isinstance(text, str):
        return ParsedOutput(scores, valid, STATUS_BAD_TAGS, False, f"not a string: {type(text).__name__}")
    has_tags = tags_ok(text)
    candidate = extract_json_text(text)
    pairs = None if candidate is None else _parse_json_object(candidate)
    if pairs is None:
        why = "no JSON object found" if candidate is None else "JSON did not decode to an object"
        status = STATUS_BAD_JSON if has_tags else STATUS_BAD_TAGS
        return ParsedOutput(scores, valid, status, False, why + ("" if has_tags else "; tags invalid"))
    ignored = 0
    for key, value in pairs:  # in text order, so the last duplicate wins
        match = _KEY.fullmatch(key)
        doc = int(match.group(1) or match.group(2)) - 1 if match else -1
        if not 0 <= doc < group_size:
            ignored += 1
            continue
        score = _as_score(value)
        valid[doc] = score is not None
        scores[doc] = 0.0 if score is None else float(score)
    status = STATUS_OK if has_tags else STATUS_BAD_TAGS
    reason = f"{int(valid.sum())}/{group_size} documents scored"
    if ignored:
        reason += f", {ignored} keys ignored"
    if not has_tags:
        reason += "; tags invalid"
    return ParsedOutput(scores, valid, status, True, reason)


def parse_batch(
    texts: Sequence[str], group_sizes: Sequence[int], pad_to: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-shape batch: scores [B, pad_to] f32, valid [B, pad_to] bool, status [B] int32."""
    if len(texts) != len(group_sizes):
        raise ValueError(f"{len(texts)} texts but {len(group_sizes)} group sizes")
    too_big = [c for c in group_sizes if c > pad_to]
    if too_big:
        raise ValueError(f"group size {max(too_big)} exceeds pad_to={pad_to}")
    batch = len(texts)
    scores = np.zeros((batch, pad_to), np.float32)  # [B, c]
    valid = np.zeros((batch, pad_to), bool)  # [B, c]
    status = np.zeros((batch,), np.int32)  # [B]
    for row, (text, size) in enumerate(zip(texts, group_sizes)):
        parsed = parse_group_output(text, size)
        scores[row, :size], valid[row, :size], status[row] = parsed.scores, parsed.valid, parsed.format_status
    return scores, valid, status
