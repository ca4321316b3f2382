"""Rerank a first-stage run with groupwise scoring, test-time-scaling repeats and score fusion.

Per query (paper-notes §2): take the top-N candidates by retriever score, shuffle them with a
seeded RNG and cut disjoint groups of ``group_size`` (the last one may be smaller); score every
group once per pass; repeat with fresh shuffles (``repeats``, test-time scaling) and average
each document's group scores. Then

    final = w * mean_group_score / 10 + (1 - w) * minmax(retriever score),   w = 0.6

with min-max normalisation over the query's top-N (a query whose top-N scores are all equal
gets 0 for every retriever term, which leaves the order to the group scores). The min-max is
our choice [INFERRED]: the reference code fuses the score of DIVER's merged file as it is
(``retriever_norm="none"``), which suits retrievers whose scores already lie in [0, 1]. A group whose
output yields no JSON scores 0 for all its documents in that pass (the official behaviour) and
is counted as a parse failure; a document missing from an otherwise parsed answer also scores 0
and is counted. Candidates beyond top-N are kept below the reranked ones, in retriever order.

The model is any ``score_fn(prompts) -> completions``; prompts of all queries of a pass are
batched together, ``batch_size`` per call, so the model sees full batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from grouprank_jax.data.formats import read_collection, read_rank_llm, read_run
from grouprank_jax.task.parsing import MAX_SCORE, parse_group_output

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[str]], list[str]]
PromptFn = Callable[[str, list[str]], str]  # (query, document texts) -> prompt string


@dataclasses.dataclass(frozen=True)
class Candidate:
    docid: str
    text: str
    score: float  # first-stage retriever score


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    top_n: int = 100  # candidates reranked per query (paper-notes §2/§7: top-100)
    group_size: int = 20  # c (paper-notes §2: 20 at eval)
    repeats: int = 1  # shuffled passes averaged (test-time scaling; 6 for the 46.8 BRIGHT run)
    fusion_weight: float = 0.6  # w on the group score; 1 - w on the retriever (paper-notes §2)
    retriever_norm: str = "minmax"  # per-query min-max [INFERRED]; "none": raw, as the reference code
    batch_size: int = 16  # prompts per score_fn call
    seed: int = 666  # the official random.seed

    def __post_init__(self):
        if self.top_n < 1 or self.group_size < 1 or self.repeats < 1 or self.batch_size < 1:
            raise ValueError(f"top_n, group_size, repeats and batch_size must be >= 1: {self}")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
        if self.retriever_norm not in ("minmax", "none"):
            raise ValueError(f"retriever_norm must be 'minmax' or 'none', got {self.retriever_norm!r}")


@dataclasses.dataclass(frozen=True)
class RerankSummary:
    queries: int
    groups: int  # groups scored, all passes
    parse_failures: int  # groups without usable JSON (all their documents scored 0)
    missing_scores: int  # documents absent from an otherwise parsed answer
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Group:
    qid: str
    doc_indices: tuple[int, ...]  # into the query's top-N list


def make_groups(num_docs: int, group_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle 0..num_docs-1 and cut consecutive disjoint groups; the last may be smaller."""
    order = list(range(num_docs))
    rng.shuffle(order)
    return [order[i : i + group_size] for i in range(0, num_docs, group_size)]


def minmax(values: np.ndarray) -> np.ndarray:
    """[n] -> [n] in [0, 1]; all zeros when the values are constant."""
    if values.size == 0 or values.max() == values.min():
        return np.zeros(values.shape, np.float64)
    # Halved first (exact) so that finite scores near the float64 range cannot overflow.
    half, low, high = values / 2, values.min() / 2, values.max() / 2
    return (half - low) / (high - low)


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rerank(
    queries: dict[str, str],
    candidates: dict[str, list[Candidate]],
    score_fn: ScoreFn,
    prompt_fn: PromptFn,
    cfg: RerankConfig = RerankConfig(),
    on_groups_done: Callable[[int], None] | None = None,
) -> tuple[dict[str, dict[str, float]], RerankSummary]:
    """Reranked run ``{qid: {docid: final score}}`` and a summary. See the module docstring."""
    start = time.perf_counter()
    missing_queries = [qid for qid in candidates if qid not in queries]
    if missing_queries:
        raise ValueError(f"{len(missing_queries)} queries have candidates but no text, e.g. {missing_queries[:3]}")
    ranked = {qid: sorted(docs, key=lambda d: (-d.score, d.docid)) for qid, docs in candidates.items() if docs}
    top = {qid: docs[: cfg.top_n] for qid, docs in ranked.items()}
    score_sums = {qid: np.zeros(len(docs)) for qid, docs in top.items()}  # [n] per query
    rng = random.Random(cfg.seed)
    groups_done = parse_failures = missing_scores = 0

    for _ in range(cfg.repeats):
        groups = [
            _Group(qid, tuple(indices))
            for qid, docs in top.items()
            for indices in make_groups(len(docs), cfg.group_size, rng)
        ]
        for batch in _chunks(groups, cfg.batch_size):
            prompts = [prompt_fn(queries[g.qid], [top[g.qid][i].text for i in g.doc_indices]) for g in batch]
            outputs = score_fn(prompts)
            if len(outputs) != len(prompts):
                raise ValueError(f"score_fn returned {len(outputs)} completions for {len(prompts)} prompts")
            for group, text in zip(batch, outputs):
                parsed = parse_group_output(text, len(group.doc_indices))
                if not parsed.json_ok:
                    parse_failures += 1
                    continue  # every document of the group scores 0 in this pass
                missing_scores += int((~parsed.valid).sum())
                score_sums[group.qid][list(group.doc_indices)] += parsed.scores / MAX_SCORE
            groups_done += len(batch)
            if on_groups_done is not None:
                on_groups_done(len(batch))

    run: dict[str, dict[str, float]] = {}
    w = cfg.fusion_weight
    for qid, docs in top.items():
        group_score = score_sums[qid] / cfg.repeats  # [n] in 0..1, mean over passes
        retriever = np.array([d.score for d in docs], dtype=np.float64)  # [n]
        retriever = minmax(retriever) if cfg.retriever_norm == "minmax" else retriever
        final = w * group_score + (1.0 - w) * retriever
        run[qid] = {d.docid: float(s) for d, s in zip(docs, final)}
        floor = min(0.0, float(final.min())) if len(final) else 0.0
        for tail_rank, doc in enumerate(ranked[qid][cfg.top_n :], 1):
            run[qid][doc.docid] = floor - float(tail_rank)  # below every reranked score
    summary = RerankSummary(
        queries=len(top),
        groups=groups_done,
        parse_failures=parse_failures,
        missing_scores=missing_scores,
        seconds=time.perf_counter() - start,
    )
    return run, summary


def load_candidates(data: str, run_path: str | None):
    """(queries {qid: text}, candidates {qid: [Candidate]}) from the supported input layouts;
    a ``ValueError`` when nothing is left to rerank (before any model is loaded)."""
    queries, candidates = _load_candidates(data, run_path)
    if not any(candidates.values()):
        source = f"the run {run_path} for the queries of {data}" if run_path else data
        raise ValueError(f"nothing to rerank: {source} holds no query with candidate documents")
    return queries, candidates


def _hit_scores(hits: list[dict], where: Callable[[int], str]) -> list[float]:
    """First-stage scores of one rank_llm entry's hits. Hits without ``score`` (all of the
    entry's, or an error) are scored by their position, 1 / (j + 1): the hit order is the first
    stage's ranking, which the top-N cut and the fusion then keep."""
    given = ["score" in h for h in hits]
    if not any(given):
        return [1.0 / (j + 1) for j in range(len(hits))]
    if not all(given):
        j = given.index(False)
        raise ValueError(f"{where(j)}: no score, while other hits of this entry have one; give all or none")
    scores = []
    for j, hit in enumerate(hits):
        try:
            score = float(hit["score"])
        except (TypeError, ValueError):
            raise ValueError(f"{where(j)}: score {hit['score']!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{where(j)}: score {hit['score']!r} is not finite")
        scores.append(score)
    return scores


def _hit_text(hit: dict, where: str) -> str:
    if not isinstance(hit["content"], str):
        raise ValueError(f"{where}: content must be a string, got {type(hit['content']).__name__}")
    return hit["content"]


def _load_candidates(data: str, run_path: str | None):
    path = Path(data)
    if path.is_file():
        entries = read_rank_llm(path)
        queries = {e.qid: e.query for e in entries}
        where = lambda i, j: f"{path}: entry {i} hit {j}"
        texts = {
            (e.qid, str(h["docid"])): _hit_text(h, where(i, j))
            for i, e in enumerate(entries)
            for j, h in enumerate(e.hits)
        }
        if run_path is None:
            candidates = {
                e.qid: [
                    Candidate(str(h["docid"]), h["content"], score)
                    for h, score in zip(e.hits, _hit_scores(e.hits, lambda j, i=i: where(i, j)))
                ]
                for i, e in enumerate(entries)
            }
            return queries, candidates
        lookup = lambda qid, docid: texts.get((qid, docid))
    elif path.is_dir():
        if run_path is None:
            raise ValueError(f"{path} is a dataset directory: pass the first-stage run with --run")
        corpus, queries = read_collection(path)
        lookup = lambda qid, docid: corpus.get(docid)
    else:
        raise ValueError(f"--data {data}: no such file or directory")
    candidates = {}
    for qid, docs in read_run(run_path).items():
        if qid not in queries:
            log.warning("query %s of %s has no text in %s; skipped", qid, run_path, data)
            continue
        missing = [d for d in docs if lookup(qid, d) is None]
        if missing:
            raise ValueError(
                f"{len(missing)} documents of query {qid} in {run_path} have no text in {data}, e.g. {missing[:3]}"
            )
        candidates[qid] = [Candidate(d, lookup(qid, d), s) for d, s in docs.items()]
    return queries, candidates
