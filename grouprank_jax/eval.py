"""Evaluate a run against qrels with trec_eval semantics (pytrec_eval does the counting).

As trec_eval: only queries present in both the run and the qrels are scored (queries without
judgments are skipped), ties in the run go to the larger docid string, and the mean is over the
scored queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from grouprank_jax.data.formats import Qrels, Run

DEFAULT_METRICS = ("ndcg_cut_10", "recall_100")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    per_query: dict[str, dict[str, float]]  # qid -> metric -> value
    mean: dict[str, float]  # metric -> mean over scored queries
    num_queries: int


def _measure_name(metric: str) -> str:
    """``ndcg_cut_10`` -> ``ndcg_cut.10`` (pytrec_eval's request syntax); ``map`` stays."""
    head, sep, tail = metric.rpartition("_")
    return f"{head}.{tail}" if sep and tail.isdigit() else metric


def evaluate(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS, relevance_level: int = 1) -> Evaluation:
    """Raises ``ValueError`` for an unknown or cutoff-less metric name and for a run none of
    whose queries are judged (a mean of 0 over nothing would read as a real score)."""
    import pytrec_eval

    metrics = [m.replace(".", "_") for m in metrics]  # ndcg_cut.10 (request syntax) = ndcg_cut_10
    unknown = [m for m in metrics if _measure_name(m).split(".")[0] not in pytrec_eval.supported_measures]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; use trec_eval names such as ndcg_cut_10, recall_100, map")
    judged = set(run) & set(qrels)
    if not judged:
        raise ValueError(
            f"no query of the run ({len(run)} queries, e.g. {sorted(run)[:3]}) has judgments in the qrels "
            f"({len(qrels)} queries, e.g. {sorted(qrels)[:3]}): are they from the same dataset?"
        )
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {_measure_name(m) for m in metrics}, relevance_level=relevance_level
    )
    results = evaluator.evaluate(run)
    reported = set(next(iter(results.values()), {}))
    vague = [m for m in metrics if m not in reported]
    if vague:
        names = sorted(r for r in reported if any(r.startswith(v) for v in vague))
        raise ValueError(f"metric(s) {vague} need a cutoff; pytrec_eval reports {names}: name one of those")
    per_query = {qid: {m: float(values[m]) for m in metrics} for qid, values in results.items()}
    count = len(per_query)
    mean = {m: (sum(v[m] for v in per_query.values()) / count if count else 0.0) for m in metrics}
    return Evaluation(per_query=per_query, mean=mean, num_queries=count)
