"""The rerank endpoint's arithmetic with a scripted model (no JAX): a random-weight model never
writes parsable JSON, so here a stub engine answers each group with the score written in each
document ("doc-7" scores 7), or with garbage for documents marked "junk"."""

from __future__ import annotations

import re

import pytest

from grouprank_jax.serve.api_errors import APIError
from grouprank_jax.serve.config import ServeConfig
from grouprank_jax.serve.engine import Generation
from grouprank_jax.serve.rerank import rerank_documents
from grouprank_jax.serve.schemas import RerankRequest
from grouprank_jax.task.prompts import load_template, render_prompt
from grouprank_jax.task.rerank import Candidate, RerankConfig, rerank
from grouprank_jax.tokenizer import load_tokenizer


def scripted_answer(prompt: str, positional: bool = False) -> str:
    """Each document's score is the number it carries, or (``positional``) its id in the group."""
    docs = re.findall(r"\[(\d+)\]\. (\w+)-(\d+)", prompt)
    if any(name == "junk" for _, name, _ in docs):
        return "<answer> no idea </answer>"
    scores = ", ".join(f'"[{i}]": {i if positional else s}' for i, _, s in docs)
    return f"<reason> r </reason> <answer> ```json {{{scores}}} ``` </answer>"


class ScriptedEngine:
    def __init__(self, positional=False, **cfg):
        self.cfg = ServeConfig(model="m", prompt="compact", max_prompt_len=512, **cfg)
        self.tokenizer = load_tokenizer()
        self.positional = positional
        self.calls = []

    def generate(self, prompts, settings, max_tokens, seed, cancel=None):
        self.calls.append((len(prompts), settings, seed))
        answers = [scripted_answer(self.tokenizer.decode(ids), self.positional) for ids in prompts]
        return [Generation((1, 2, 3), a, "stop", len(ids)) for a, ids in zip(answers, prompts)]


def _rerank(engine, **body):
    return rerank_documents(
        RerankRequest(**body), engine=engine, template=load_template("compact"), model_name="m", request_id="r"
    )


def test_scores_are_the_model_scores_over_10_sorted_and_cut():
    engine = ScriptedEngine(group_size=3)
    docs = ["doc-2", "doc-9", "doc-5", "doc-0", "doc-7"]
    out = _rerank(engine, query="q", documents=docs, top_n=3, return_documents=True)
    assert [(r["index"], r["relevance_score"], r["document"]["text"]) for r in out["results"]] == [
        (1, pytest.approx(0.9), "doc-9"),
        (4, pytest.approx(0.7), "doc-7"),
        (2, pytest.approx(0.5), "doc-5"),
    ]
    assert out["meta"] == {
        "groups": 2,
        "parse_failures": 0,
        "missing_scores": 0,
        "group_size": 3,
        "repeats": 1,
        "fused_with_first_stage": False,
    }
    assert engine.calls[0][0] == 2 and engine.calls[0][1].stop == ("</answer>",)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 2 * 3


def test_repeats_submit_one_pass_each_and_unparsable_groups_score_0():
    engine = ScriptedEngine(group_size=1, repeats=2, seed=5)
    out = _rerank(engine, query="q", documents=["doc-4", "junk-9"])
    assert [c[2] for c in engine.calls] == [5, 6]  # seed + pass, as the CLI's seed + call
    assert {r["index"]: r["relevance_score"] for r in out["results"]} == {0: pytest.approx(0.4), 1: 0.0}
    assert out["meta"]["parse_failures"] == 2 and out["meta"]["groups"] == 4


def test_first_stage_scores_are_fused_with_the_weight_rule():
    engine = ScriptedEngine(group_size=2, fusion_weight=0.6)
    docs = [{"text": "doc-10", "score": 1.0}, {"text": "doc-0", "score": 3.0}]
    scores = {r["index"]: r["relevance_score"] for r in _rerank(engine, query="q", documents=docs)["results"]}
    assert scores == {0: pytest.approx(0.6 * 1.0 + 0.4 * 0.0), 1: pytest.approx(0.6 * 0.0 + 0.4 * 1.0)}


def test_grouping_is_the_rerank_librarys_with_the_cli_seed():
    """With scores that depend on where a document lands (its id within its group), the endpoint
    equals ``task.rerank.rerank`` as ``grouprank rerank`` calls it: same seeded shuffles, repeats,
    fusion."""
    engine = ScriptedEngine(positional=True, group_size=3, repeats=3, seed=11)
    docs = [{"text": f"doc-{i}", "score": float(i % 4)} for i in range(10)]
    out = _rerank(engine, query="q", documents=docs)
    tok, template = engine.tokenizer, load_template("compact")
    run, _ = rerank(
        {"q": "q"},
        {"q": [Candidate(str(i), d["text"], d["score"]) for i, d in enumerate(docs)]},
        lambda prompts: [scripted_answer(p, positional=True) for p in prompts],
        lambda q, group: render_prompt(tok, q, group, template, 3000, 512),
        RerankConfig(top_n=10, group_size=3, repeats=3, fusion_weight=0.6, seed=11),
    )
    assert {r["index"]: r["relevance_score"] for r in out["results"]} == {int(d): s for d, s in run["q"].items()}
    assert len({r["relevance_score"] for r in out["results"]}) > 3  # the grouping shows in the scores


def test_limits_are_checked_before_any_generation():
    engine = ScriptedEngine(max_documents=2)
    with pytest.raises(APIError, match="exceed the limit of 2") as err:
        _rerank(engine, query="q", documents=["doc-1"] * 3)
    assert err.value.status == 400 and err.value.code == "too_many_documents" and not engine.calls
