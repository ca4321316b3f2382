"""Shared-prefix decode: B prompts x n rollouts reading one prompt KV, against the same rows
without sharing.

    grouprank bench shared-prefix --out benchmarks/cpu_shared_prefix.json

Three runs of the same Sampler code on the same random weights, greedy, stops off (every row
decodes exactly ``--new-tokens``):
- ``shared``: ``--prompts`` prompts x ``--n`` rollouts, one prompt KV per prompt (the default);
- ``separate``: the same ``prompts * n`` rows passed as that many prompts with n = 1 (what a
  sampler without multi-sampling does);
- ``per_row``: prompts x n with ``shared_prefix=False`` (each row holds a copy of its prompt).
Each is called twice and the second call is timed (``SamplerStats.decode_seconds``); the
outputs of the three must be identical token for token. The compiled decode program's
``memory_analysis()`` (arguments + temporaries) is reported beside the time. The default shape
is one where reading KV dominates a decode step: 8 layers, hidden 256, 4 KV heads of 64, the
real 151,936 vocabulary, fp32, prompt 2,048, 128 new tokens, 2 prompts x 8.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from grouprank_jax.bench.shapes import add_shape_args, model_from_shape_args
from grouprank_jax.sampling import Sampler, SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    add_shape_args(p, layers=8, kv_heads=4)
    p.add_argument("--out", help="write the results as JSON here")
    return p


def _decode_memory(sampler: Sampler, prompts: int, prompt_len: int, params: SamplingParams) -> dict:
    _, decode = sampler.lower(prompts, prompt_len, params)
    mem = decode.compile().memory_analysis()
    return {
        "decode_argument_mb": mem.argument_size_in_bytes / 1e6,
        "decode_temp_mb": mem.temp_size_in_bytes / 1e6,
        "decode_output_mb": mem.output_size_in_bytes / 1e6,
        "decode_alias_mb": mem.alias_size_in_bytes / 1e6,
    }


def run_bench(args: argparse.Namespace) -> list[dict]:
    model = model_from_shape_args(args)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.prompts)]
    rows = args.prompts * args.n
    runs = {
        "shared": (True, prompts, args.n),
        "separate": (True, [p for p in prompts for _ in range(args.n)], 1),
        "per_row": (False, prompts, args.n),
    }
    results, outputs = [], {}
    for name, (shared, batch, n) in runs.items():
        sampler = Sampler(model, max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens, shared_prefix=shared)
        params = SamplingParams(temperature=0.0, n=n, max_new_tokens=args.new_tokens, ignore_eos=True)
        sampler.generate(batch, params)  # compile + warm up
        out = sampler.generate(batch, params)
        outputs[name] = out.tokens
        steps = out.stats.decode_steps
        results.append(
            {
                "layout": name,
                "prompts": len(batch),
                "n": n,
                "rows": rows,
                "decode_seconds": out.stats.decode_seconds,
                "ms_per_step": 1e3 * out.stats.decode_seconds / max(steps - 1, 1),  # step 0 samples from the prefill
                "decode_tokens_per_s": rows * steps / out.stats.decode_seconds,
                **_decode_memory(sampler, len(batch), args.prompt_len, params),
            }
        )
    base = results[0]["decode_seconds"]
    for r in results:
        r["time_vs_shared"] = r["decode_seconds"] / base
    for name in ("separate", "per_row"):
        if not np.array_equal(outputs[name], outputs["shared"]):
            raise AssertionError(f"{name} tokens differ from the shared-prefix tokens")
    return results


def _print_table(results: list[dict]) -> None:
    cols = ["layout", "prompts", "n", "rows", "decode_seconds", "ms_per_step", "time_vs_shared"]
    cols += ["decode_argument_mb", "decode_temp_mb"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    results = run_bench(args)
    _print_table(results)
    print("outputs identical across the three layouts")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
