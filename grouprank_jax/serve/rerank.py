"""``POST /v1/rerank``: one query's documents scored by ``task.rerank.rerank``, as ``grouprank rerank``.

The request's documents become one query's candidates (docid = the document's index, retriever
score = its ``score`` or 0), so grouping (seeded shuffles into disjoint groups of ``group_size``),
``repeats`` and the fusion rule are the library's, unchanged. Each pass's groups go to the engine
as one submission (batched with other requests'); seeds are ``--seed`` + the pass, as the CLI's
``seed + call`` when a pass is one call. ``relevance_score`` is the mean group score / 10, or, when
every document carries a first-stage ``score``, ``w * that + (1 - w) * minmax(scores)``
(``--fusion-weight`` w). A group whose answer has no JSON scores 0 and is counted in ``meta``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from grouprank_jax.serve.api_errors import bad_request
from grouprank_jax.serve.engine import Engine, GenSettings
from grouprank_jax.serve.schemas import RerankRequest
from grouprank_jax.task.prompts import PromptTemplate, render_prompt
from grouprank_jax.task.rerank import Candidate, RerankConfig, rerank

ANSWER_STOP = ("</answer>",)
QID = "q"


def rerank_documents(
    req: RerankRequest,
    *,
    engine: Engine,
    template: PromptTemplate,
    model_name: str,
    request_id: str,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """The response body of a validated rerank request (blocks until the groups are scored)."""
    cfg, tokenizer = engine.cfg, engine.tokenizer
    docs = req.documents
    if not docs:
        raise bad_request("documents must not be empty", "documents")
    if len(docs) > cfg.max_documents:
        raise bad_request(
            f"{len(docs)} documents exceed the limit of {cfg.max_documents} (--max-documents)",
            "documents",
            "too_many_documents",
        )
    texts = [d if isinstance(d, str) else d.text for d in docs]
    given = [None if isinstance(d, str) else d.score for d in docs]
    if any(s is None for s in given) and any(s is not None for s in given):
        raise bad_request("give a first-stage score for every document or for none", "documents")
    fused = given[0] is not None
    for i, score in enumerate(given):
        if score is not None and not math.isfinite(score):
            raise bad_request(f"documents[{i}].score must be a finite number, got {score}", f"documents.{i}.score")
    candidates = [Candidate(str(i), text, float(s or 0.0)) for i, (text, s) in enumerate(zip(texts, given))]
    rerank_cfg = RerankConfig(
        top_n=len(docs),
        group_size=cfg.group_size,
        repeats=cfg.repeats,
        fusion_weight=cfg.fusion_weight if fused else 1.0,
        batch_size=len(docs),  # every group of a pass in one submission
        seed=cfg.seed,
    )
    settings = GenSettings.make(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_tokens=cfg.max_new_tokens,
        stop=ANSWER_STOP,
        cap=cfg.max_new_tokens,
    )
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}

    def prompt_fn(query: str, group: list[str]) -> str:
        try:
            return render_prompt(tokenizer, query, group, template, cfg.max_doc_chars, cfg.max_prompt_len)
        except ValueError as err:  # the query and template alone exceed the budget
            raise bad_request(f"{err} (--max-prompt-len {cfg.max_prompt_len})", "query", "prompt_too_long") from None

    def score_fn(prompts: list[str]) -> list[str]:
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        gens = engine.generate(ids, settings, cfg.max_new_tokens, cfg.seed + usage["calls"], cancel)
        usage["calls"] += 1
        usage["prompt_tokens"] += sum(len(p) for p in ids)
        usage["completion_tokens"] += sum(len(g.token_ids) for g in gens)
        return [g.text for g in gens]

    run, summary = rerank({QID: req.query}, {QID: candidates}, score_fn, prompt_fn, rerank_cfg)
    scores = run[QID]
    order = sorted(range(len(docs)), key=lambda i: (-scores[str(i)], i))
    results = []
    for i in order[: req.top_n or len(docs)]:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[str(i)]}
        if req.return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {
        "id": f"rerank-{request_id}",
        "model": model_name,
        "results": results,
        "usage": {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        },
        "meta": {
            "groups": summary.groups,
            "parse_failures": summary.parse_failures,
            "missing_scores": summary.missing_scores,
            "group_size": cfg.group_size,
            "repeats": cfg.repeats,
            "fused_with_first_stage": fused,
        },
    }
