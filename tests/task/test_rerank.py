"""Reranking with a deterministic stand-in scorer: grouping, batching, averaging and fusion."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from grouprank_jax.task.prompts import format_passages, format_target
from grouprank_jax.task.rerank import Candidate, RerankConfig, make_groups, minmax, rerank

DOC_SCORE = {"a": 0, "b": 2, "c": 10, "d": 10, "e": 5}  # the stand-in model's opinion
RETRIEVER = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0}


def prompt_fn(query: str, docs: list[str]) -> str:
    return f"Query: {query}\n" + format_passages(docs)


def _docs_in(prompt: str) -> list[str]:
    return re.findall(r"\[\d+\]\. (\S+)", prompt)


class StandInScorer:
    """Scores documents from a table; records every call. ``pass_scores`` overrides per call."""

    def __init__(self, table=DOC_SCORE, per_call=None):
        self.table, self.per_call, self.calls = table, per_call, []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.calls.append(prompts)
        outs = []
        for prompt in prompts:
            docs = _docs_in(prompt)
            if self.per_call is not None:
                value = self.per_call[len(self.calls) - 1]
                if value is None:
                    outs.append("I cannot decide.")
                    continue
                scores = [value] * len(docs)
            else:
                scores = [self.table[d] for d in docs]
            outs.append(format_target(scores, "stand-in"))
        return outs


def _inputs():
    queries = {"q1": "which letter?"}
    candidates = {"q1": [Candidate(d, d, s) for d, s in RETRIEVER.items()]}
    return queries, candidates


def test_fusion_and_order():
    queries, candidates = _inputs()
    scorer = StandInScorer()
    run, summary = rerank(queries, candidates, scorer, prompt_fn, RerankConfig(group_size=2, repeats=3, batch_size=2))
    retriever = {"a": 1.0, "b": 0.75, "c": 0.5, "d": 0.25, "e": 0.0}  # min-max of 5..1
    want = {d: 0.6 * DOC_SCORE[d] / 10 + 0.4 * retriever[d] for d in DOC_SCORE}
    assert run["q1"] == pytest.approx(want)
    assert sorted(run["q1"], key=run["q1"].get, reverse=True) == ["c", "d", "b", "a", "e"]
    assert (summary.queries, summary.groups, summary.parse_failures, summary.missing_scores) == (1, 9, 0, 0)
    # 3 groups per pass (2 + 2 + 1), batch_size 2 -> 2 calls per pass.
    assert [len(c) for c in scorer.calls] == [2, 1] * 3


def test_each_pass_covers_every_document_once():
    queries, candidates = _inputs()
    scorer = StandInScorer()
    rerank(queries, candidates, scorer, prompt_fn, RerankConfig(group_size=2, repeats=4, batch_size=8))
    passes = [sorted(d for p in call for d in _docs_in(p)) for call in scorer.calls]
    assert passes == [sorted(DOC_SCORE)] * 4
    groupings = {tuple(tuple(_docs_in(p)) for p in call) for call in scorer.calls}
    assert len(groupings) > 1  # fresh shuffles per pass


def test_averaging_and_parse_failures():
    queries, candidates = _inputs()
    # Pass 1 scores everything 10, pass 2 everything 4, pass 3 is unparseable (-> 0).
    scorer = StandInScorer(per_call=[10, 4, None])
    run, summary = rerank(
        queries, candidates, scorer, prompt_fn, RerankConfig(group_size=5, repeats=3, fusion_weight=1.0)
    )
    assert run["q1"] == pytest.approx({d: (1.0 + 0.4 + 0.0) / 3 for d in DOC_SCORE})
    assert summary.parse_failures == 1 and summary.groups == 3


def test_top_n_tail_and_pure_retriever():
    queries = {"q": "x"}
    candidates = {"q": [Candidate(f"d{i}", f"t{i}", float(10 - i)) for i in range(7)]}
    scorer = StandInScorer(table={f"t{i}": 10 - i for i in range(7)})
    run, summary = rerank(
        queries, candidates, scorer, prompt_fn, RerankConfig(top_n=4, group_size=3, fusion_weight=0.0)
    )
    order = sorted(run["q"], key=run["q"].get, reverse=True)
    assert order == [f"d{i}" for i in range(7)]  # w=0 keeps the retriever order, tail below
    assert all(run["q"][f"d{i}"] < 0 for i in range(4, 7)) and summary.groups == 2


def test_raw_retriever_scores_fuse_unnormalised():
    """retriever_norm="none" (the reference code): final = w * g / 10 + (1 - w) * raw score, and the
    tail still ranks below every reranked document when raw scores are negative."""
    queries = {"q": "x"}
    candidates = {"q": [Candidate(f"d{i}", f"t{i}", -2.0 * i) for i in range(5)]}
    scorer = StandInScorer(table={f"t{i}": 2 * i for i in range(5)})
    cfg = RerankConfig(top_n=3, group_size=3, retriever_norm="none")
    run, _ = rerank(queries, candidates, scorer, prompt_fn, cfg)
    assert {f"d{i}": run["q"][f"d{i}"] for i in range(3)} == pytest.approx(
        {f"d{i}": 0.6 * 2 * i / 10 + 0.4 * -2.0 * i for i in range(3)}
    )
    assert max(run["q"]["d3"], run["q"]["d4"]) < min(run["q"][f"d{i}"] for i in range(3))
    assert run["q"]["d3"] > run["q"]["d4"]
    with pytest.raises(ValueError, match="retriever_norm"):
        RerankConfig(retriever_norm="zscore")


def test_missing_documents_score_zero_and_are_counted():
    queries, candidates = _inputs()

    def partial(prompts):
        return ['<reason>r</reason><answer>{"[1]": 10}</answer>' for _ in prompts]

    run, summary = rerank(queries, candidates, partial, prompt_fn, RerankConfig(group_size=5, fusion_weight=1.0))
    assert summary.missing_scores == 4 and summary.parse_failures == 0
    assert sorted(run["q1"].values()) == [0, 0, 0, 0, 1.0]


def test_make_groups_and_minmax():
    groups = make_groups(45, 20, random.Random(0))
    assert [len(g) for g in groups] == [20, 20, 5]
    assert sorted(i for g in groups for i in g) == list(range(45))
    assert make_groups(45, 20, random.Random(0)) == groups  # seeded
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    np.testing.assert_allclose(minmax(np.array([3.0, 3.0])), [0, 0])


def test_bad_inputs():
    queries, candidates = _inputs()
    with pytest.raises(ValueError, match="completions"):
        rerank(queries, candidates, lambda p: [], prompt_fn)
    with pytest.raises(ValueError, match="no text"):
        rerank({}, candidates, StandInScorer(), prompt_fn)
    with pytest.raises(ValueError, match="fusion_weight"):
        RerankConfig(fusion_weight=1.5)
