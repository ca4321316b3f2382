"""``grouprank eval``: score a TREC run against qrels with trec_eval semantics."""

from __future__ import annotations

import argparse
import json

from grouprank_jax.data.formats import read_qrels, read_run
from grouprank_jax.eval import DEFAULT_METRICS, evaluate


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a TREC run against qrels (trec_eval semantics)")
    parser.add_argument("--run", required=True, help="TREC run file (qid Q0 docid rank score tag)")
    parser.add_argument("--qrels", required=True, help="qrels file (qid 0 docid rel, or BEIR TSV)")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated trec_eval names, e.g. ndcg_cut_10,map"
    )
    parser.add_argument("--relevance-level", type=int, default=1, help="minimum grade counted relevant (recall, map)")
    parser.add_argument("--per-query", action="store_true", help="also print every query's values")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    run, qrels = read_run(args.run), read_qrels(args.qrels)
    for path, lines in ((args.run, run), (args.qrels, qrels)):
        if not lines:
            raise ValueError(f"{path}: no lines to evaluate (the file is empty)")
    result = evaluate(run, qrels, metrics, args.relevance_level)
    if args.json:
        payload = {"mean": result.mean, "num_queries": result.num_queries}
        if args.per_query:
            payload["per_query"] = result.per_query
        print(json.dumps(payload, indent=1))
        return 0
    if args.per_query:
        for qid, values in sorted(result.per_query.items()):
            print(qid, " ".join(f"{m}={v:.4f}" for m, v in values.items()))
    print(f"queries: {result.num_queries}")
    for metric, value in result.mean.items():
        print(f"{metric}\t{value:.4f}")
    return 0
