"""Shared inputs of the synth tests: the shipped DL19 data (rank_llm BM25 top-100 with texts, qrels).
Test modules import the ``dl19`` fixture from here."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def dl19(shared_data):
    from grouprank_jax.data.formats import read_qrels, read_rank_llm

    data = shared_data / "trec_dl" / "rank_llm.BM25.retrieve_results_dl19.json"
    qrels_path = shared_data / "trec_dl" / "anserini-tools.qrels.dl19-passage.txt"
    entries = read_rank_llm(data)
    return {
        "data": data,
        "qrels_path": qrels_path,
        "entries": entries,
        "queries": {e.qid: e.query for e in entries},
        "texts": {str(h["docid"]): h["content"] for e in entries for h in e.hits},
        "qrels": read_qrels(qrels_path),
    }


def subset(dl19, path: Path, n: int) -> Path:
    """The first ``n`` DL19 queries as a rank_llm JSON file."""
    from grouprank_jax.data.formats import write_rank_llm

    write_rank_llm(dl19["entries"][:n], path)
    return path


def teacher_args(url: str) -> list[str]:
    return [
        "--pointwise-url",
        url,
        "--pointwise-model",
        "test-pointwise",
        "--listwise-url",
        url,
        "--listwise-model",
        "test-listwise",
        "--backoff",
        "0.01",
        "--no-progress",
    ]


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())
