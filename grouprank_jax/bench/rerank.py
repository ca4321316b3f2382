"""The group-size trade-off: rerank a fixed top-100 per query at several group sizes.

    grouprank bench rerank --group-sizes 5,10,20,30,50 --preset tiny --out bench_rerank.json
    grouprank bench rerank --model runs/demo/grpo --group-sizes 5,10,20   # a scorer with signal

Per group size: prompt tokens per group, prefill and decode seconds per query, peak memory
and NDCG@10 (meaningful only with a trained scorer). Data: the demo generator's held-out
split with ``--candidates`` documents per query (bundled, deterministic) unless ``--data`` points
to a BEIR-style directory with a first-stage run. Writes JSON and a PNG.
``run_bench(args)`` is the entry point for ``grouprank bench rerank``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax

from grouprank_jax.config import model_preset
from grouprank_jax.data.formats import read_beir_corpus, read_beir_queries, read_qrels, read_run
from grouprank_jax.demo.data import DemoDataConfig, write_demo_data
from grouprank_jax.eval import evaluate
from grouprank_jax.models import create_model
from grouprank_jax.task.prompts import load_template, render_prompt
from grouprank_jax.task.rerank import Candidate, RerankConfig, rerank
from grouprank_jax.task.scoring import ScoringCounters, sampler_score_fn
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.weights.loading import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group-sizes", default="5,10,20,30,50")
    p.add_argument("--preset", default="tiny", help="random-weight model shape when --model is not given")
    p.add_argument("--model", help="HF dir, import-hf checkpoint or training run dir")
    p.add_argument("--data", help="directory with corpus.jsonl, queries.jsonl, run.trec, qrels.tsv")
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt", default="compact")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench_rerank.json")
    return p


def _data_dir(args) -> Path:
    if args.data:
        return Path(args.data)

    tmp = Path(tempfile.mkdtemp(prefix="grouprank_bench_"))
    paths = write_demo_data(
        tmp, DemoDataConfig(eval_queries=args.queries, eval_candidates=args.candidates, sft_records=1, rl_records=1)
    )
    return paths["eval"]


def run_bench(args) -> list[dict]:

    data = _data_dir(args)
    corpus = read_beir_corpus(data / "corpus.jsonl")
    queries = read_beir_queries(data / "queries.jsonl")
    first_stage = read_run(data / "run.trec")
    qrels = read_qrels(data / "qrels.tsv")
    candidates = {q: [Candidate(d, corpus[d], s) for d, s in docs.items()] for q, docs in first_stage.items()}
    candidates = dict(list(candidates.items())[: args.queries])
    model = (
        load_model(args.model)
        if args.model
        else create_model(model_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype))
    )
    tokenizer = load_tokenizer()
    template = load_template(args.prompt)
    rows = []
    for size in (int(s) for s in args.group_sizes.split(",")):
        counters = ScoringCounters()
        max_prompt_len = 128 * size + 1024
        score_fn = sampler_score_fn(
            model,
            tokenizer,
            max_prompt_len=max_prompt_len,
            max_new_tokens=args.max_new_tokens + 8 * size,
            temperature=0.0,
            counters=counters,
        )
        run, summary = rerank(
            queries,
            candidates,
            score_fn,
            lambda q, docs, limit=max_prompt_len: render_prompt(tokenizer, q, docs, template, max_prompt_len=limit),
            RerankConfig(top_n=args.candidates, group_size=size, batch_size=64),
        )
        stats = jax.devices()[0].memory_stats() or {}
        n_q = len(candidates)
        rows.append(
            {
                "group_size": size,
                "groups": summary.groups,
                "prompt_tokens_per_group": counters.prompt_tokens / summary.groups,
                "prefill_s_per_query": counters.prefill_seconds / n_q,
                "decode_s_per_query": counters.decode_seconds / n_q,
                "generated_tokens_per_query": counters.generated_tokens / n_q,
                "parse_failures": summary.parse_failures,
                "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
                "ndcg@10": _ndcg(run, qrels),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _ndcg(run, qrels):
    try:
        return evaluate(run, qrels, ("ndcg_cut_10",)).mean["ndcg_cut_10"]
    except ImportError:  # pytrec_eval is absent on some accelerator images
        return None


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    sizes = [r["group_size"] for r in rows]
    axes[0].plot(sizes, [r["prefill_s_per_query"] for r in rows], marker="o", label="prefill")
    axes[0].plot(sizes, [r["decode_s_per_query"] for r in rows], marker="o", label="decode")
    axes[0].set_title("seconds per query")
    axes[0].legend()
    axes[1].plot(sizes, [r["prompt_tokens_per_group"] for r in rows], marker="o")
    axes[1].set_title("prompt tokens per group")
    axes[2].plot(sizes, [r["ndcg@10"] or 0.0 for r in rows], marker="o")
    axes[2].set_title("NDCG@10")
    for ax in axes:
        ax.set_xlabel("group size")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = run_bench(args)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    _plot(rows, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
