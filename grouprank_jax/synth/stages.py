"""Stages 2, 3 and the optional reasoning calls: teacher requests in rounds.

Each round sends every request that is due (all queries together), so an HTTP teacher sees
``concurrency`` requests in flight and the in-process teacher sees full batches.

Format retries (INFERRED): an unparsable answer is asked again up to ``max_retries`` times; a
retry's body adds ``"seed": attempt`` and uses ``retry_temperature`` (0.7), since a teacher at
temperature 0 would repeat itself. The changed body is a new cache key, and every body is a
pure function of the inputs, so an interrupted and restarted run sends exactly the requests an
uninterrupted one would. After the last retry the item is recorded as missing.

Listwise: the whole pool in one call when it has at most ``window_max`` (50) documents, else
rank_llm's sliding window (``window`` 20, ``stride`` 10) from the bottom of the list to the top.
The input order (``order="pointwise"``, the issue's choice for the sliding window, also used for
the single call; INFERRED) is the pointwise teacher's order; ``order="pool"`` uses first-stage
order. A window whose answers all fail keeps its input order and is counted as missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tqdm.auto import tqdm

from grouprank_jax.synth.client import Teacher
from grouprank_jax.synth.prompts import (
    listwise_messages,
    parse_listwise,
    parse_pointwise,
    parse_reason,
    pointwise_messages,
    reason_messages,
)

LISTWISE_ORDERS = ("pointwise", "pool")


@dataclasses.dataclass(frozen=True)
class CallConfig:
    temperature: float = 0.0  # [INFERRED] deterministic labels
    retry_temperature: float = 0.7  # [INFERRED] see the module docstring
    max_retries: int = 3
    max_doc_chars: int = 3000  # [paper-notes §1] the character cut of the groupwise prompt
    pointwise_max_tokens: int = 64
    listwise_max_tokens: int = 4096
    reason_max_tokens: int = 1024
    window_max: int = 50  # --listwise-window: the whole pool in one call up to this many documents
    window: int = 20  # rank_llm / ReasonRank sliding window
    stride: int = 10
    order: str = "pointwise"

    def __post_init__(self):
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.order not in LISTWISE_ORDERS:
            raise ValueError(f"--listwise-order {self.order!r}; choose one of {LISTWISE_ORDERS}")
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"--window-stride {self.stride} must be in 1..--window-size {self.window}")

    def params(self, attempt: int, max_tokens: int) -> dict:
        if attempt == 0:
            return {"temperature": self.temperature, "max_tokens": max_tokens}
        return {"temperature": self.retry_temperature, "max_tokens": max_tokens, "seed": attempt}


@dataclasses.dataclass
class StageCounts:
    items: int = 0
    format_failures: int = 0  # unparsable answers (each attempt counts)
    retried: int = 0  # items asked again after an unparsable answer
    missing: int = 0  # items without a usable answer after all retries
    repaired: int = 0  # listwise answers that needed the permutation repair

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bar(desc: str, total: int, teacher: Teacher, progress: bool):
    bar = tqdm(total=total, desc=desc, unit="req", disable=not progress, leave=False)

    def update(n: int) -> None:
        s = teacher.stats
        bar.update(n)
        bar.set_postfix(done=s.requests, cached=s.cached, retried=s.http_retries, tokens=s.completion_tokens)

    return bar, update


def pointwise_stage(
    pools: Mapping[str, Sequence[str]],
    queries: Mapping[str, str],
    texts: Mapping[str, str],
    teacher: Teacher,
    cfg: CallConfig,
    progress: bool = True,
) -> tuple[dict[str, dict[str, int | None]], StageCounts]:
    items = [(qid, d) for qid, pool in pools.items() for d in pool]
    counts = StageCounts(items=len(items))
    scores: dict[str, dict[str, int | None]] = {qid: dict.fromkeys(pool) for qid, pool in pools.items()}
    pending, attempt = items, 0
    bar, update = _bar("pointwise", len(items), teacher, progress)
    with bar:
        while pending and attempt <= cfg.max_retries:
            bodies = [
                teacher.body(
                    pointwise_messages(queries[q], texts[d], cfg.max_doc_chars),
                    **cfg.params(attempt, cfg.pointwise_max_tokens),
                )
                for q, d in pending
            ]
            bar.total = bar.n + len(bodies)
            answers = teacher.complete(bodies, update)
            failed = []
            for (q, d), answer in zip(pending, answers):
                value = parse_pointwise(answer.text)
                if value is None:
                    failed.append((q, d))
                else:
                    scores[q][d] = value
            counts.format_failures += len(failed)
            attempt += 1
            if attempt <= cfg.max_retries:
                counts.retried += len(failed)
            pending = failed
    counts.missing = len(pending)
    return scores, counts


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """rank_llm's windows, bottom-up: (start, end) pairs, end exclusive."""
    spans, end, start = [], n, n - window
    while end > 0 and start + stride != 0:
        start = max(start, 0)
        spans.append((start, end))
        end -= stride
        start -= stride
    return spans


@dataclasses.dataclass
class _Listing:
    qid: str
    order: list[str]
    windows: list[tuple[int, int]]
    step: int = 0
    attempt: int = 0


def listwise_stage(
    initial: Mapping[str, Sequence[str]],
    queries: Mapping[str, str],
    texts: Mapping[str, str],
    teacher: Teacher,
    cfg: CallConfig,
    progress: bool = True,
) -> tuple[dict[str, list[str]], StageCounts]:
    """``initial``: each query's input order. Returns the teacher's (repaired) order per query."""
    states = []
    for qid, order in initial.items():
        n = len(order)
        windows = [(0, n)] if n <= cfg.window_max else sliding_windows(n, cfg.window, cfg.stride)
        states.append(_Listing(qid, list(order), windows))
    counts = StageCounts(items=sum(len(s.windows) for s in states))
    bar, update = _bar("listwise", counts.items, teacher, progress)
    with bar:
        while True:
            due = [s for s in states if s.step < len(s.windows)]
            if not due:
                break
            bodies = []
            for s in due:
                start, end = s.windows[s.step]
                docs = [texts[d] for d in s.order[start:end]]
                bodies.append(
                    teacher.body(
                        listwise_messages(queries[s.qid], docs, cfg.max_doc_chars),
                        **cfg.params(s.attempt, cfg.listwise_max_tokens),
                    )
                )
            bar.total = bar.n + len(bodies)
            for s, answer in zip(due, teacher.complete(bodies, update)):
                start, end = s.windows[s.step]
                parsed = parse_listwise(answer.text, end - start)
                if parsed is None:
                    counts.format_failures += 1
                    s.attempt += 1
                    if s.attempt <= cfg.max_retries:
                        counts.retried += 1
                        continue
                    counts.missing += 1  # keeps its input order
                else:
                    permutation, repaired = parsed
                    counts.repaired += int(repaired)
                    window = s.order[start:end]
                    s.order[start:end] = [window[i - 1] for i in permutation]
                s.step, s.attempt = s.step + 1, 0
    return {s.qid: s.order for s in states}, counts


def reason_stage(
    jobs: Sequence[tuple[str, Sequence[str], Sequence[int]]],
    teacher: Teacher,
    cfg: CallConfig,
    progress: bool = True,
) -> tuple[list[str | None], StageCounts]:
    """One reasoning per (query, document texts, scores); None where the teacher gave none."""
    counts = StageCounts(items=len(jobs))
    out: list[str | None] = [None] * len(jobs)
    pending, attempt = list(range(len(jobs))), 0
    bar, update = _bar("reasoning", len(jobs), teacher, progress)
    with bar:
        while pending and attempt <= cfg.max_retries:
            bodies = [
                teacher.body(
                    reason_messages(jobs[i][0], jobs[i][1], jobs[i][2], cfg.max_doc_chars),
                    **cfg.params(attempt, cfg.reason_max_tokens),
                )
                for i in pending
            ]
            bar.total = bar.n + len(bodies)
            failed = []
            for i, answer in zip(pending, teacher.complete(bodies, update)):
                out[i] = parse_reason(answer.text)
                if out[i] is None:
                    failed.append(i)
            counts.format_failures += len(failed)
            attempt += 1
            if attempt <= cfg.max_retries:
                counts.retried += len(failed)
            pending = failed
    counts.missing = len(pending)
    return out, counts
