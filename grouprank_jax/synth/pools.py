"""Stage 1: first-stage runs -> one candidate pool per query (paper-notes §5.1).

With several runs the first stage is their hybrid: per query every run's scores are min-max
normalised to [0, 1] (INFERRED: the notes say "norm to [0, 1]") and combined as
``alpha * norm(s1) + (1 - alpha) * norm(s2)`` (alpha 0.5); a document absent from a run gets 0
for that run (INFERRED). With more than two runs, the first weighs ``alpha`` and the others share
``1 - alpha`` equally (INFERRED). Ties are broken by the rank in the first run, then by docid.

The pool is the top ``pool_top`` (10, "potential positives") plus ``pool_random`` (40) documents
sampled without replacement from ranks ``pool_top + 1 .. pool_depth`` (11-200), seeded per query
(``random.Random("{seed}:pool:{qid}")``, so a query's pool does not depend on the other queries).
The pool is kept in first-stage order. A query with fewer candidates than wanted keeps what it has
and is reported; one with fewer than ``min_pool`` is dropped and reported.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from grouprank_jax.data.formats import Run
from grouprank_jax.task.rerank import minmax


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    top: int = 10  # [paper-notes §5.1] potential positives
    random: int = 40  # [§5.1] hard negatives sampled from ranks top+1..depth
    depth: int = 200  # [§5.1] ranks 11-200
    alpha: float = 0.5  # [§5.1] hybrid weight of the first run
    min_pool: int = 5  # [INFERRED] smaller pools are dropped (and reported): the smallest group is 5
    seed: int = 0

    def __post_init__(self):
        if self.top < 0 or self.random < 0 or self.top + self.random < 1:
            raise ValueError(f"--pool-top and --pool-random must be >= 0 with a positive sum, got {self}")
        if self.depth < self.top:
            raise ValueError(f"--pool-depth {self.depth} must be >= --pool-top {self.top}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")

    @property
    def size(self) -> int:
        return self.top + self.random


def hybrid_ranking(runs: Sequence[Run], alpha: float = 0.5) -> dict[str, list[tuple[str, float]]]:
    """``{qid: [(docid, fused score), ...]}`` best first, over the union of the runs' documents."""
    if not runs:
        raise ValueError("no first-stage run given")
    if len(runs) == 1:
        weights = [1.0]
    else:
        weights = [alpha] + [(1.0 - alpha) / (len(runs) - 1)] * (len(runs) - 1)
    out = {}
    qids = list(dict.fromkeys(q for run in runs for q in run))
    for qid in qids:
        docids = list(dict.fromkeys(d for run in runs for d in run.get(qid, {})))
        total = np.zeros(len(docids))  # [n]
        for run, weight in zip(runs, weights):
            docs = run.get(qid, {})
            present = np.array([d in docs for d in docids])  # [n]
            values = np.array([docs.get(d, 0.0) for d in docids], dtype=np.float64)  # [n]
            norm = np.zeros(len(docids))
            if present.any():
                norm[present] = minmax(values[present])
            total += weight * norm
        first = runs[0].get(qid, {})
        first_rank = {d: r for r, (d, _) in enumerate(sorted(first.items(), key=lambda kv: -kv[1]))}
        order = sorted(range(len(docids)), key=lambda i: (-total[i], first_rank.get(docids[i], len(first)), docids[i]))
        out[qid] = [(docids[i], float(total[i])) for i in order]
    return out


@dataclasses.dataclass(frozen=True)
class Pools:
    pools: dict[str, list[str]]  # qid -> docids in first-stage order
    first_stage_rank: dict[str, dict[str, int]]  # qid -> docid -> 1-based first-stage rank
    short: list[dict]  # {"qid", "candidates", "pool", "wanted"} for pools below the wanted size
    dropped: list[dict]  # {"qid", "candidates", "reason"} queries left out


def sample_pool(ranked: Sequence[str], qid: str, cfg: PoolConfig) -> list[str]:
    """Top ``cfg.top`` plus ``cfg.random`` sampled from ranks top+1..depth, in first-stage order."""
    head = list(ranked[: cfg.top])
    tail = list(range(cfg.top, min(cfg.depth, len(ranked))))
    rng = random.Random(f"{cfg.seed}:pool:{qid}")
    picked = sorted(rng.sample(tail, min(cfg.random, len(tail))))
    return head + [ranked[i] for i in picked]


def build_pools(ranking: dict[str, list[tuple[str, float]]], queries: dict[str, str], cfg: PoolConfig) -> Pools:
    pools, ranks, short, dropped = {}, {}, [], []
    for qid, scored in ranking.items():
        ranked = [d for d, _ in scored]
        if qid not in queries:
            dropped.append({"qid": qid, "candidates": len(ranked), "reason": "no query text"})
            continue
        pool = sample_pool(ranked, qid, cfg)
        if len(pool) < cfg.min_pool:
            dropped.append(
                {"qid": qid, "candidates": len(ranked), "reason": f"fewer than --min-pool {cfg.min_pool} candidates"}
            )
            continue
        if len(pool) < cfg.size:
            short.append({"qid": qid, "candidates": len(ranked), "pool": len(pool), "wanted": cfg.size})
        pools[qid] = pool
        ranks[qid] = {d: r for r, d in enumerate(ranked, 1)}
    for qid in queries:
        if qid not in ranking:
            dropped.append({"qid": qid, "candidates": 0, "reason": "no first-stage candidates"})
    return Pools(pools, {q: {d: ranks[q][d] for d in p} for q, p in pools.items()}, short, dropped)
