"""``grouprank synth``: teacher label synthesis, from a corpus, queries and first-stage runs to
the SFT and RL data ``grouprank sft`` / ``grouprank grpo`` read (paper-notes §5; README "Make training data").

    grouprank synth --data dl19.json --out synth/ --pointwise-url http://host:8000/v1 \\
        --pointwise-model Qwen3-235B --listwise-url http://host:8001/v1 --listwise-model gemini-2.5-pro

A teacher is an OpenAI-compatible endpoint (``--X-url`` + ``--X-model``) or, with no URL, a model
run in-process on the JAX sampler (``--X-model PATH``). Rerunning the same command resumes: every
answer is cached on disk (default ``OUT/cache/teachers.jsonl``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from grouprank_jax.commands import seed_int

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="teacher label synthesis: first-stage runs -> SFT and RL data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--data", required=True, help="rank_llm JSON, or a BEIR/TSV dataset directory")
    io.add_argument(
        "--run", action="append", default=[], help="first-stage TREC run (repeat for a hybrid; default: BM25)"
    )
    io.add_argument("--out", required=True, help="output directory")
    io.add_argument("--qrels", help="optional: NDCG@10 of the teachers' and fused lists in the manifest")
    io.add_argument("--cache", help="teacher answer cache (default OUT/cache/teachers.jsonl)")
    io.add_argument("--no-progress", action="store_true")

    for role, required in (("pointwise", True), ("listwise", True), ("reason", False)):
        g = p.add_argument_group(f"{role} teacher" + ("" if required else " (optional, INFERRED; off by default)"))
        g.add_argument(f"--{role}-url", help="OpenAI-compatible base URL (POST URL/chat/completions)")
        g.add_argument(f"--{role}-model", help="model name at the URL, or a model PATH to run in-process (no URL)")
    t = p.add_argument_group("teacher calls")
    t.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    t.add_argument("--concurrency", type=int, default=16, help="HTTP requests in flight per teacher")
    t.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request")
    t.add_argument("--http-retries", type=int, default=6, help="retries on 429/5xx/timeouts/connection errors")
    t.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubled each retry (jittered)")
    t.add_argument("--max-retries", type=int, default=3, help="re-asks after an unparsable answer")
    t.add_argument("--temperature", type=float, default=0.0, help="teacher temperature (INFERRED: 0)")
    t.add_argument("--retry-temperature", type=float, default=0.7, help="temperature of re-asks (INFERRED)")
    t.add_argument("--max-doc-chars", type=int, default=3000, help="character cut per document in prompts")
    t.add_argument("--pointwise-max-tokens", type=int, default=64)
    t.add_argument("--listwise-max-tokens", type=int, default=4096)
    t.add_argument("--reason-max-tokens", type=int, default=1024)
    t.add_argument("--teacher-batch-size", type=int, default=16, help="in-process teacher: prompts per batch")
    t.add_argument("--teacher-max-prompt-len", type=int, default=8192, help="in-process teacher: token budget")
    t.add_argument("--tokenizer", help="in-process teacher: tokenizer directory (default: bundled Qwen2.5)")

    s = p.add_argument_group("pools, listwise windows, fusion, groups")
    s.add_argument("--pool-top", type=int, default=10, help="top documents kept (potential positives)")
    s.add_argument("--pool-random", type=int, default=40, help="documents sampled from ranks pool-top+1..depth")
    s.add_argument("--pool-depth", type=int, default=200, help="deepest first-stage rank sampled")
    s.add_argument("--min-pool", type=int, default=5, help="queries with fewer candidates are dropped (reported)")
    s.add_argument("--alpha", type=float, default=0.5, help="hybrid weight of the first --run")
    s.add_argument("--listwise-window", type=int, default=50, help="whole pool in one listwise call up to this size")
    s.add_argument("--window-size", type=int, default=20, help="sliding window beyond --listwise-window")
    s.add_argument("--window-stride", type=int, default=10)
    s.add_argument("--listwise-order", choices=("pointwise", "pool"), default="pointwise", help="listwise input order")
    s.add_argument("--beta", type=float, default=0.5, help="Eq. 2 weight of the pointwise rank")
    s.add_argument("--pointwise-ties", choices=("min", "position"), default="min", help="ranks of tied scores")
    s.add_argument("--group-sizes", default="5-20", help="allowed group sizes, e.g. 5-20 or 5,10,20")
    s.add_argument("--group-mix", default="paper", help="paper | uniform | SIZE:WEIGHT,...")
    s.add_argument("--sft-groups-per-query", type=int, default=2)
    s.add_argument("--rl-groups-per-query", type=int, default=1)
    s.add_argument("--interval-offset", choices=("random", "zero"), default="random")
    s.add_argument("--rl-gold", choices=("fused", "pointwise"), default="fused", help="RL gold labels")
    s.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=run)


def _teacher(args, role: str, cache, loaded: dict):
    from grouprank_jax.errors import UserError
    from grouprank_jax.synth.client import HttpBackend, HttpConfig, Teacher, TeacherStats

    url, model = getattr(args, f"{role}_url"), getattr(args, f"{role}_model")
    if not url and not model:
        return None
    stats = TeacherStats()
    if url:
        if not model:
            raise UserError(f"--{role}-url needs --{role}-model (the model name the endpoint serves)")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--{role}-url {url}: give the scheme, e.g. http://{url}")
        cfg = HttpConfig(
            url=url,
            model=model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            timeout=args.timeout,
            http_retries=args.http_retries,
            backoff=args.backoff,
        )
        return Teacher(role, HttpBackend(cfg, stats), cache)
    from grouprank_jax.synth.jax_teacher import JaxBackend

    if not Path(model).exists():
        raise UserError(f"--{role}-model {model}: no such model directory (give --{role}-url for a served model)")
    key = str(Path(model).resolve())
    backend = JaxBackend(
        model,
        stats,
        tokenizer_path=args.tokenizer,
        batch_size=args.teacher_batch_size,
        max_prompt_len=args.teacher_max_prompt_len,
        max_new_tokens=max(args.pointwise_max_tokens, args.listwise_max_tokens, args.reason_max_tokens),
        loaded=loaded.get(key),
    )
    loaded[key] = backend.loaded
    return Teacher(role, backend, cache)


def config_from_args(args):
    from grouprank_jax.synth.groups import GroupConfig, parse_sizes
    from grouprank_jax.synth.pipeline import SynthConfig
    from grouprank_jax.synth.pools import PoolConfig
    from grouprank_jax.synth.stages import CallConfig

    return SynthConfig(
        data=args.data,
        out=args.out,
        runs=tuple(args.run),
        qrels=args.qrels,
        pools=PoolConfig(args.pool_top, args.pool_random, args.pool_depth, args.alpha, args.min_pool, args.seed),
        calls=CallConfig(
            temperature=args.temperature,
            retry_temperature=args.retry_temperature,
            max_retries=args.max_retries,
            max_doc_chars=args.max_doc_chars,
            pointwise_max_tokens=args.pointwise_max_tokens,
            listwise_max_tokens=args.listwise_max_tokens,
            reason_max_tokens=args.reason_max_tokens,
            window_max=args.listwise_window,
            window=args.window_size,
            stride=args.window_stride,
            order=args.listwise_order,
        ),
        groups=GroupConfig(
            sizes=parse_sizes(args.group_sizes),
            mix=args.group_mix,
            sft_per_query=args.sft_groups_per_query,
            rl_per_query=args.rl_groups_per_query,
            offset=args.interval_offset,
            rl_gold=args.rl_gold,
            seed=args.seed,
        ),
        beta=args.beta,
        pointwise_ties=args.pointwise_ties,
    )


def run(args: argparse.Namespace) -> int:
    from grouprank_jax.errors import UserError
    from grouprank_jax.synth.cache import DiskCache
    from grouprank_jax.synth.pipeline import run_synth

    cfg = config_from_args(args)
    if not Path(args.data).exists():
        raise UserError(f"--data {args.data}: no such file or directory")
    if args.qrels:  # read now, not after every teacher call has been paid for
        from grouprank_jax.data.formats import read_qrels

        read_qrels(args.qrels)
    for role in ("pointwise", "listwise"):
        if not getattr(args, f"{role}_url") and not getattr(args, f"{role}_model"):
            raise UserError(f"give the {role} teacher: --{role}-url URL --{role}-model NAME, or --{role}-model PATH")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with DiskCache(args.cache or Path(args.out) / "cache" / "teachers.jsonl") as cache:
        loaded: dict = {}
        teachers = {role: _teacher(args, role, cache, loaded) for role in ("pointwise", "listwise", "reason")}
        teachers = {role: t for role, t in teachers.items() if t is not None}
        manifest = run_synth(cfg, teachers, progress=not args.no_progress)
    totals, counts = manifest["totals"], manifest["counts"]
    print(
        f"synth: {counts['queries']} queries, {counts['pool_documents']} pool documents -> "
        f"{counts['sft_records']} SFT + {counts['rl_records']} RL records in {args.out} | "
        f"calls {totals['calls']} cached {totals['cached']} retried {totals['retried']} "
        f"repaired {totals['repaired']} missing {totals['missing']} | "
        f"tokens {totals['prompt_tokens']} in / {totals['completion_tokens']} out"
    )
    for name, value in (manifest.get("quality") or {}).items():
        print(f"  ndcg_cut_10 {name}: {value['ndcg_cut_10']:.4f} over {value['queries']} queries")
    return 0
