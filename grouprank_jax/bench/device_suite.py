"""One-shot accelerator suite: every GPU measurement the issues ask for, in one process.

    grouprank bench device-suite --out results.json          # on the accelerator (or PYTHONPATH=. python -m ...)
    grouprank bench device-suite --smoke --out smoke.json    # tiny shapes, any backend

Sections (each guarded: a failure is recorded and the suite goes on; a deadline stops new
sections so partial results always come back):
1. device copy bandwidth (the decode roofline's denominator);
2. a Qwen2.5-7B-shaped bf16 forward of one 24k-token sequence with the fused kernel (cuDNN on
   NVIDIA) vs the pure-JAX chunked kernel: time and max |difference| of the final hidden states;
3. shared-prefix decode at the paper's prompt length (issue 14): one 24k-token prompt x 8
   rollouts against the same 8 rows passed as 8 prompts, decode tokens/s and the fraction of the
   bandwidth bound of each;
4. the GRPO update, shared prompt forward vs per-rollout, LoRA at long prompts: step time, MFU
   counted on the tokens each layout computes;
5. sampler prefill/decode tokens/s with the fraction of the memory-bandwidth bound;
6. SFT train step time, tokens/s and MFU (bf16 compute, fp32 master weights).
``--sections a,b`` runs a subset (a rerun of the ones that failed).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grouprank_jax.bench import grpo_update as bench_grpo
from grouprank_jax.bench import sampling as bench_sampling
from grouprank_jax.bench import train as bench_train
from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.sampling import Sampler, SamplingParams


def _timeit(fn, repeats=3):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def attention_24k(preset: str, tokens: int) -> dict:
    cfg = model_preset(preset, dtype="bfloat16", param_dtype="bfloat16")
    fused = "cudnn" if jax.default_backend() == "gpu" else "reference"
    _, state = nnx.split(create_model(cfg.replace(attention_impl=fused)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens)), jnp.int32)
    out, hidden = {}, {}
    for impl in (fused, "chunked"):
        # same weights, another kernel: only the (static) graph definition changes
        graphdef = nnx.graphdef(
            nnx.eval_shape(lambda impl=impl: Qwen2ForCausalLM(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0)))
        )
        fwd = jax.jit(lambda s, x, gd=graphdef: nnx.merge(gd, s)(x, return_hidden=True)[:, -512:])
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state, ids))
        out[f"{impl}_first_call_s"] = time.perf_counter() - t0
        out[f"{impl}_s"] = _timeit(lambda fwd=fwd: fwd(state, ids), repeats=2)
        hidden[impl] = np.asarray(fwd(state, ids).astype(jnp.float32))
    a, b = hidden[fused], hidden["chunked"]
    out.update(
        preset=preset,
        tokens=tokens,
        fused=fused,
        max_abs_diff=float(np.abs(a - b).max()),
        mean_abs_diff=float(np.abs(a - b).mean()),
        hidden_abs_mean=float(np.abs(b).mean()),
    )
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return out


def sampling(preset: str, batches, prompt_len: int, new_tokens: int, bandwidth: float | None) -> list[dict]:

    cfg = model_preset(preset, dtype="bfloat16", param_dtype="bfloat16")
    model = create_model(cfg)
    sampler = Sampler(model, max_prompt_len=prompt_len, max_new_tokens=new_tokens)
    weight_bytes = cfg.num_params * 2
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        prompts = [list(rng.integers(0, 150000, prompt_len)) for _ in range(b)]
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        sampler.generate(prompts, params)  # compile
        best = None
        for _ in range(2):
            out = sampler.generate(prompts, params)
            if best is None or out.stats.decode_seconds < best.stats.decode_seconds:
                best = out
        s = best.stats
        step_s = s.decode_seconds / max(s.decode_steps - 1, 1)  # step 0 samples from the prefill
        step_bytes = bench_sampling.decode_bytes_per_step(
            cfg, weight_bytes, s.batch_bucket, 1, s.prompt_bucket, new_tokens, sampler.shared_prefix
        )
        rows.append(
            {
                "preset": preset,
                "batch": b,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "prefill_tok_s": s.prompt_tokens / s.prefill_seconds,
                "decode_tok_s": s.generated_tokens / s.decode_seconds,
                "decode_step_ms": 1e3 * step_s,
                "bandwidth_fraction": None if bandwidth is None else step_bytes / step_s / bandwidth,
            }
        )
        print(rows[-1], flush=True)
    del model, sampler
    return rows


def shared_prefix_long(preset: str, prompt_len: int, n: int, new_tokens: int, bandwidth: float | None) -> list[dict]:
    """One prompt x n rollouts (one prompt KV) against the same n rows as n prompts (n KV copies):
    greedy, every row decodes ``new_tokens``; the second call of each is timed."""
    cfg = model_preset(preset, dtype="bfloat16", param_dtype="bfloat16")
    model = create_model(cfg)
    weight_bytes = cfg.num_params * 2
    prompt = np.random.default_rng(0).integers(0, 150000, prompt_len).tolist()
    rows, tokens = [], {}
    for layout, batch, k in (("shared", [prompt], n), ("separate", [prompt] * n, 1)):
        sampler = Sampler(model, max_prompt_len=prompt_len, max_new_tokens=new_tokens)
        params = SamplingParams(temperature=0.0, n=k, max_new_tokens=new_tokens, ignore_eos=True)
        sampler.generate(batch, params)  # compile
        out = sampler.generate(batch, params)
        s = out.stats
        step_s = s.decode_seconds / max(s.decode_steps - 1, 1)  # step 0 samples from the prefill
        step_bytes = bench_sampling.decode_bytes_per_step(
            cfg, weight_bytes, len(batch), k, s.prompt_bucket, new_tokens, sampler.shared_prefix
        )
        tokens[layout] = np.asarray(out.tokens)
        rows.append(
            {
                "layout": layout,
                "preset": preset,
                "prompts": len(batch),
                "n": k,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "prefill_s": s.prefill_seconds,
                "decode_s": s.decode_seconds,
                "decode_tok_s": s.generated_tokens / s.decode_seconds,
                "decode_step_ms": 1e3 * step_s,
                "step_read_gb": step_bytes / 1e9,
                "bandwidth_fraction": None if bandwidth is None else step_bytes / step_s / bandwidth,
            }
        )
        print(rows[-1], flush=True)
        del sampler, out
        gc.collect()
    rows[1]["time_vs_shared"] = rows[1]["decode_s"] / rows[0]["decode_s"]
    # bf16 on a GPU: the two layouts' attention reductions may round differently, so a greedy
    # tie can flip; record agreement rather than fail the suite.
    rows[0]["tokens_identical"] = bool(np.array_equal(tokens["shared"], tokens["separate"]))
    rows[0]["tokens_agree_fraction"] = float(np.mean(tokens["shared"] == tokens["separate"]))
    for row in rows:  # every row decodes the same prompt: within a layout they must all agree
        same = tokens[row["layout"]]
        row["rows_identical_within_layout"] = bool((same == same[:1]).all())
    return rows


def grpo_update(preset: str, prompts: int, rollouts: int, prompt_len: int, response_len: int, lora: int) -> list:
    argv = ["--preset", preset, "--dtype", "bfloat16", "--lora", str(lora), "--remat", "full", "--repeats", "2"]
    argv += ["--prompts", str(prompts), "--rollouts", str(rollouts)]
    argv += ["--prompt-len", str(prompt_len), "--response-len", str(response_len)]
    return bench_grpo.run_bench(bench_grpo.build_parser().parse_args(argv))


def train(preset: str, batch: int, seq: int, lora: int, remat: str) -> dict:
    args = bench_train.build_parser().parse_args(
        [
            "--preset",
            preset,
            "--batch",
            str(batch),
            "--seq-len",
            str(seq),
            "--dtype",
            "bfloat16",
            "--lora",
            str(lora),
            "--remat",
            remat,
            "--steps",
            "3",
            "--loss-chunk",
            "2048",
        ]
    )
    return bench_train.run_bench(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--deadline-s", type=float, default=520.0)
    p.add_argument("--sections", help="comma-separated section names to run (default: all)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results: dict = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "sections": {},
    }
    small = args.smoke
    plan = [
        ("bandwidth", lambda: {"read_bytes_per_s": bench_sampling.read_bandwidth(64 if small else 2048)}),
        (
            "shared_prefix_7b_24k",
            lambda: shared_prefix_long(
                "tiny" if small else "qwen2.5-7b", 256 if small else 24576, 8, 16 if small else 128, bw()
            ),
        ),
        (
            "grpo_update_1.5b_lora",
            lambda: grpo_update(
                "tiny" if small else "qwen2.5-1.5b", 1, 8, 128 if small else 8192, 16 if small else 1024, 32
            ),
        ),
        (
            "sampling_1.5b",
            lambda: sampling(
                "tiny" if small else "qwen2.5-1.5b",
                [8] if small else [1, 8],
                128 if small else 1024,
                16 if small else 128,
                bw(),
            ),
        ),
        (
            "grpo_update_7b_lora",
            lambda: grpo_update(
                "tiny" if small else "qwen2.5-7b", 1, 8, 128 if small else 8192, 16 if small else 1024, 32
            ),
        ),
        ("attention_24k", lambda: attention_24k("tiny" if small else "qwen2.5-7b", 1024 if small else 24576)),
        (
            "sampling_7b",
            lambda: sampling(
                "tiny" if small else "qwen2.5-7b",
                [1, 8] if small else [1, 8, 32],
                128 if small else 1024,
                16 if small else 128,
                bw(),
            ),
        ),
        (
            "train_1.5b",
            lambda: train("tiny" if small else "qwen2.5-1.5b", 2 if small else 8, 128 if small else 2048, 0, "full"),
        ),
        (
            "train_7b_lora",
            lambda: train("tiny" if small else "qwen2.5-7b", 2 if small else 4, 128 if small else 2048, 32, "full"),
        ),
    ]

    def bw():
        # The measured figure (sections are stored as {"result": ..., "wall_s": ...}); a failed
        # measurement leaves the fractions out rather than dividing by a guessed number.
        return (results["sections"].get("bandwidth", {}).get("result") or {}).get("read_bytes_per_s")

    wanted = set(args.sections.split(",")) if args.sections else {name for name, _ in plan}
    unknown = wanted - {name for name, _ in plan}
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {[name for name, _ in plan]}")
    for name, fn in plan:
        if name not in wanted:
            continue
        if time.perf_counter() - start > args.deadline_s:
            results["sections"][name] = {"skipped": "deadline"}
            continue
        t0 = time.perf_counter()
        try:
            results["sections"][name] = fn()
        except Exception as err:
            results["sections"][name] = {
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-3000:],
            }
        results["sections"][name] = {"result": results["sections"][name], "wall_s": time.perf_counter() - t0}
        print(name, json.dumps(results["sections"][name], default=str)[:1500], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        gc.collect()
        jax.clear_caches()
    # Every section runs even when one fails (device time is scarce); the exit status still says so.
    failed = [name for name, sec in results["sections"].items() if "error" in (sec.get("result") or {})]
    if failed:
        print(f"device suite: {len(failed)} section(s) failed: {', '.join(failed)} (see {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
