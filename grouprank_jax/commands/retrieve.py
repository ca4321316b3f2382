"""``grouprank retrieve``: BM25 first stage over a BEIR or TSV dataset directory."""

from __future__ import annotations

import argparse
import logging

from grouprank_jax.commands import positive_int
from grouprank_jax.data.formats import read_collection, write_run
from grouprank_jax.retrieve import bm25_run

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("retrieve", help="BM25 first-stage retrieval (bm25s) -> TREC run")
    parser.add_argument(
        "--data", required=True, help="dataset dir: corpus.jsonl+queries.jsonl or corpus.tsv+queries.tsv"
    )
    parser.add_argument("--out", required=True, help="output TREC run file")
    parser.add_argument("--top-k", type=positive_int, default=100, help="documents kept per query")
    parser.add_argument("--k1", type=float, default=0.9, help="BM25 k1 (Pyserini default)")
    parser.add_argument("--b", type=float, default=0.4, help="BM25 b (Pyserini default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    corpus, queries = read_collection(args.data)
    result = bm25_run(corpus, queries, top_k=args.top_k, k1=args.k1, b=args.b)
    write_run(result, args.out, tag="bm25s")
    log.info("wrote %s: %d queries, %d documents indexed", args.out, len(result), len(corpus))
    return 0
