"""``grouprank rerank``: groupwise LLM reranking of a first-stage run (paper-notes §2).

Inputs: ``--data`` is either a rank_llm JSON (queries + candidate hits with text and scores; the
hits are the first stage unless ``--run`` is given) or a dataset directory (BEIR jsonl or
NovelEval-style TSV) together with ``--run``.
"""

from __future__ import annotations

import argparse
import logging
import math

from tqdm.auto import tqdm

from grouprank_jax.commands import seed_int
from grouprank_jax.data.formats import read_qrels, write_run
from grouprank_jax.eval import evaluate
from grouprank_jax.task.prompts import load_template, render_prompt
from grouprank_jax.task.rerank import RerankConfig, load_candidates, rerank
from grouprank_jax.task.scoring import ScoringCounters, sampler_score_fn
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.weights.loading import load_model

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("rerank", help="rerank a first-stage run with a groupwise LLM")
    parser.add_argument(
        "--model", required=True, help="a HF Qwen2 directory, an import-hf checkpoint or a training run directory"
    )
    parser.add_argument("--data", required=True, help="rank_llm JSON file, or a BEIR/TSV dataset directory")
    parser.add_argument("--run", help="first-stage TREC run (required with a dataset directory)")
    parser.add_argument("--out", required=True, help="output TREC run file")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the bundled Qwen2.5 tokenizer)")
    parser.add_argument(
        "--prompt", default="grouprank", help="preset (grouprank, grouprank-sft, compact) or YAML/JSON file"
    )
    parser.add_argument("--top-n", type=int, default=100, help="candidates reranked per query")
    parser.add_argument("--group-size", type=int, default=20, help="documents per group (c)")
    parser.add_argument("--repeats", type=int, default=1, help="shuffled passes averaged (test-time scaling)")
    parser.add_argument("--fusion-weight", type=float, default=0.6, help="weight of the group score vs the retriever")
    parser.add_argument(
        "--retriever-norm",
        choices=("minmax", "none"),
        default="minmax",
        help="retriever scores min-max normalised per query (ours) or fused raw (reference code)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--max-doc-chars", type=int, default=3000, help="character cut per document")
    parser.add_argument(
        "--max-prompt-len",
        type=int,
        default=24000,
        help="prompt token budget; documents shrink to fit (official: max_model_len 32000 - 8000 generated)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=8000, help="generation budget (official: 8000)")
    parser.add_argument("--temperature", type=float, default=0.3, help="official inference value")
    parser.add_argument("--top-p", type=float, default=0.8, help="official inference value")
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--seed", type=seed_int, default=666, help="shuffling and sampling seed (official: 666)")
    parser.add_argument("--qrels", help="if given, print trec_eval metrics of the input and the reranked run")
    parser.set_defaults(func=run)


def _model_score_fn(args, tokenizer, counters: dict):
    """score_fn backed by the JAX sampler; counts generated tokens into ``counters``."""

    model = load_model(args.model)
    stats = ScoringCounters()
    inner = sampler_score_fn(
        model,
        tokenizer,
        max_prompt_len=args.max_prompt_len,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        counters=stats,
    )

    def score_fn(prompts: list[str]) -> list[str]:
        texts = inner(prompts)
        counters["calls"], counters["tokens"] = stats.calls, stats.generated_tokens
        counters["prompt_tokens"] = stats.prompt_tokens
        return texts

    return score_fn


def run(args: argparse.Namespace) -> int:

    cfg = RerankConfig(
        top_n=args.top_n,
        group_size=args.group_size,
        repeats=args.repeats,
        fusion_weight=args.fusion_weight,
        retriever_norm=args.retriever_norm,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    queries, candidates = load_candidates(args.data, args.run)
    template = load_template(args.prompt)
    tokenizer = load_tokenizer(args.tokenizer)

    def prompt_fn(query: str, docs: list[str]) -> str:
        return render_prompt(tokenizer, query, docs, template, args.max_doc_chars, args.max_prompt_len)

    counters = {"calls": 0, "tokens": 0}
    score_fn = _model_score_fn(args, tokenizer, counters)
    total_groups = cfg.repeats * sum(math.ceil(min(len(d), cfg.top_n) / cfg.group_size) for d in candidates.values())
    with tqdm(total=total_groups, desc="groups", unit="group") as bar:
        reranked, summary = rerank(queries, candidates, score_fn, prompt_fn, cfg, on_groups_done=bar.update)
    write_run(reranked, args.out, tag="grouprank")
    print(
        f"queries {summary.queries} | groups {summary.groups} | parse failures {summary.parse_failures} "
        f"| missing doc scores {summary.missing_scores} | generated tokens {counters['tokens']} "
        f"| {summary.seconds:.1f} s ({counters['tokens'] / max(summary.seconds, 1e-9):.1f} tok/s) -> {args.out}"
    )
    if args.qrels:
        qrels = read_qrels(args.qrels)
        first_stage = {q: {c.docid: c.score for c in docs} for q, docs in candidates.items()}
        for name, run_scores in (("first stage", first_stage), ("reranked", reranked)):
            result = evaluate(run_scores, qrels, ("ndcg_cut_10",))
            print(f"{name}: ndcg_cut_10 {result.mean['ndcg_cut_10']:.4f} over {result.num_queries} queries")
    return 0
