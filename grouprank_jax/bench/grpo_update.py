"""The GRPO policy update with a shared prompt forward against the per-rollout update.

    grouprank bench grpo-update --out benchmarks/cpu_grpo_update.json

One jitted update (``rl/step.py::make_grpo_update``, forward + backward + AdamW) on the same
weights and the same rollout batch, in two layouts (``GRPOConfig.shared_prefix``):
- ``shared``: each prompt's forward once, its G responses over that KV (P + G*C tokens/prompt);
- ``per_rollout``: every rollout row runs its whole prompt + response (G*(P + C) tokens/prompt).
Default shape (the issue's): 2 prompts x G = 8, prompt 1,024, response 64, a 4-layer width-256
model with the real 151,936 vocabulary, fp32, full fine-tuning; ``--preset qwen2.5-1.5b --dtype
bfloat16 --lora 32 --remat full`` runs a real shape instead (fp32 master weights, bf16 compute),
and on a chip with a known peak the rows carry MFU counted on the tokens each layout computes.
Each update is compiled, run once to warm up, then timed over ``--repeats`` calls; the compiled
program's ``memory_analysis()`` gives its temporaries. The two updates' losses and gradient
norms must agree (1e-4 relative in fp32, 2e-2 in bf16, where the two layouts round differently),
or the benchmark fails.

``--compare-trl N``: besides, one whole GRPO step (sample G rollouts of ``--response-len``
tokens for one prompt, then the update) of ours against TRL 1.16's ``GRPOTrainer`` (PyTorch,
same weights exported to HF format, same prompt, G, lengths, beta and learning rate), N steps
each after a warm-up step, seconds per step side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from grouprank_jax.bench.shapes import add_shape_args, model_from_shape_args
from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model
from grouprank_jax.preflight.flops import mfu, shared_prefix_training_flops, training_flops
from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.rl.losses import loss_kwargs
from grouprank_jax.rl.step import make_grpo_update, make_logprob_fn
from grouprank_jax.training.state import init_train_state, make_optimizer
from grouprank_jax.weights.loading import with_lora


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--rollouts", type=int, default=8, help="G rollouts per prompt")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--response-len", type=int, default=64)
    add_shape_args(p, layers=4, kv_heads=2)
    p.add_argument("--preset", help="a model preset instead of the shape arguments (e.g. qwen2.5-1.5b)")
    p.add_argument("--dtype", default="float32", help="compute dtype with --preset (master weights stay fp32)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"], help="with --preset")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-trl", type=int, default=0, metavar="STEPS", help="also time TRL's GRPOTrainer")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def rollout_batch(rng, prompts: int, rollouts: int, prompt_len: int, response_len: int, vocab: int) -> dict:
    """Prompt-major rows with full-length prompts and responses (the worst case for both)."""
    rows = prompts * rollouts
    prompt = np.repeat(rng.integers(0, vocab, (prompts, prompt_len)), rollouts, axis=0)
    seq = np.concatenate([prompt, rng.integers(0, vocab, (rows, response_len))], axis=1).astype(np.int32)
    return {
        "seq_ids": seq,
        "seq_mask": np.ones_like(seq),
        "completion_mask": np.ones((rows, response_len), np.int32),
        "advantages": rng.standard_normal(rows).astype(np.float32),
    }


def _model(args: argparse.Namespace):
    if not args.preset:
        model = model_from_shape_args(args)
    else:
        cfg = model_preset(args.preset, dtype=args.dtype, param_dtype="float32", remat=args.remat)
        model = create_model(cfg, seed=0)
    if args.lora:
        model = with_lora(model, args.lora, 2.0 * args.lora, model.cfg.lora_targets, None, 0)
    return model


def run_bench(args: argparse.Namespace) -> list[dict]:
    model = _model(args)
    cfg, lora = model.cfg, bool(args.lora)
    G, P, C = args.rollouts, args.prompt_len, args.response_len
    rows = rollout_batch(np.random.default_rng(0), args.prompts, G, P, C, cfg.vocab_size)
    tx = make_optimizer(1e-5, 100)
    state = init_train_state(model, tx, lora=lora)
    old = make_logprob_fn(state.graphdef, P, cfg.loss_chunk_size, use_lora=lora, rollouts=G)(
        state.trainable, state.frozen, rows["seq_ids"], rows["seq_mask"]
    )
    batch = {**rows, "old_logp": old, "ref_logp": old}
    # Both layouts run the LM head on the completion positions only (completion_logprobs).
    completions = args.prompts * G * C
    layouts = {
        "shared": (G, shared_prefix_training_flops(cfg, args.prompts, G, P, C, lora, head_tokens=completions)),
        "per_rollout": (None, training_flops(cfg, args.prompts * G, P + C, lora, head_tokens=completions)),
    }
    results, device = [], str(jax.devices()[0].device_kind)
    for name, (rollouts, flops) in layouts.items():
        update = make_grpo_update(
            state.graphdef, tx, loss_kwargs(GRPOConfig()), P, cfg.loss_chunk_size, donate=False, rollouts=rollouts
        )
        compiled = update.lower(state.trainable, state.frozen, state.opt_state, batch).compile()
        memory = compiled.memory_analysis()
        jax.block_until_ready(compiled(state.trainable, state.frozen, state.opt_state, batch))  # warm up
        start = time.perf_counter()
        for _ in range(args.repeats):
            _, _, metrics = jax.block_until_ready(compiled(state.trainable, state.frozen, state.opt_state, batch))
        seconds = (time.perf_counter() - start) / args.repeats
        tokens = args.prompts * (P + G * C) if rollouts else args.prompts * G * (P + C)
        results.append(
            {
                "layout": name,
                "rows": args.prompts * G,
                "tokens_computed": tokens,
                "seconds_per_update": seconds,
                "gflop_per_update": flops / 1e9,
                "achieved_gflop_per_s": flops / seconds / 1e9,
                "temp_mb": memory.temp_size_in_bytes / 1e6,
                "argument_mb": memory.argument_size_in_bytes / 1e6,
                "loss": float(metrics["loss"]),
                "grad_norm": float(metrics["grad_norm"]),
                "model": args.preset or f"{cfg.num_layers}x{cfg.hidden_size}",
                "dtype": cfg.dtype,
                "lora_rank": args.lora,
                "mfu": mfu(flops, seconds, 1, device),  # None where the chip's peak is unknown (CPU)
            }
        )
        print({k: results[-1][k] for k in ("layout", "tokens_computed", "seconds_per_update", "mfu")}, flush=True)
    shared, oracle = results
    for r in results:
        r["time_vs_shared"] = r["seconds_per_update"] / shared["seconds_per_update"]
        r["temp_vs_shared"] = r["temp_mb"] / shared["temp_mb"]
    tolerance = 1e-4 if cfg.dtype == "float32" else 2e-2
    for key in ("loss", "grad_norm"):
        shared[f"{key}_rel_diff"] = abs(shared[key] - oracle[key]) / max(abs(oracle[key]), 1e-6)
        if shared[f"{key}_rel_diff"] > tolerance:
            raise AssertionError(f"shared {key} {shared[key]} != per-rollout {oracle[key]}")
    return results


def compare_trl(args: argparse.Namespace) -> list[dict]:
    """Seconds per whole GRPO step (sample + update), ours vs TRL's GRPOTrainer, same weights."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from grouprank_jax.rl.rollout import assemble_rows
    from grouprank_jax.sampling import Sampler, SamplingParams
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights.hf_io import save_hf

    model, tokenizer = model_from_shape_args(args), load_tokenizer()
    G, C, steps = args.rollouts, args.response_len, args.compare_trl
    prompt = " ".join(["relevance"] * args.prompt_len)  # one token per word in Qwen2's vocabulary
    P_max = len(tokenizer.encode(prompt)) + 8
    tx = make_optimizer(1e-5, 100)
    state = init_train_state(model, tx, lora=False)
    sampler = Sampler(model, tokenizer=tokenizer, max_prompt_len=P_max, max_new_tokens=C)
    chunk = model.cfg.loss_chunk_size

    def our_step(state, seed: int):
        sampler.model = state.model
        params = SamplingParams(temperature=1.0, n=G, max_new_tokens=C, seed=seed, ignore_eos=True)
        out = sampler.generate([prompt], params)
        P, rows = assemble_rows(tokenizer, [prompt], out, G, sampler.pad_id, sampler.buckets, C)
        rows["advantages"] = np.random.default_rng(seed).standard_normal(G).astype(np.float32)
        if P not in fns:
            fns[P] = (
                make_grpo_update(state.graphdef, tx, loss_kwargs(GRPOConfig()), P, chunk, rollouts=G),
                make_logprob_fn(state.graphdef, P, chunk, use_lora=False, rollouts=G),
            )
        update, ref = fns[P]
        rows["ref_logp"] = ref(state.trainable, state.frozen, rows["seq_ids"], rows["seq_mask"])
        trainable, opt_state, metrics = update(state.trainable, state.frozen, state.opt_state, rows)
        jax.block_until_ready(metrics)
        return dataclasses.replace(state, trainable=trainable, opt_state=opt_state)

    fns: dict = {}
    state = our_step(state, 0)  # compile + warm up
    start = time.perf_counter()
    for i in range(steps):
        state = our_step(state, i + 1)
    ours = (time.perf_counter() - start) / steps

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start)

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model_from_shape_args(args), f"{tmp}/model", tokenizer=tokenizer)  # ours were donated: same seed
        hf_model = AutoModelForCausalLM.from_pretrained(f"{tmp}/model", dtype=torch.float32)
        config = TRLConfig(
            output_dir=f"{tmp}/trl",
            per_device_train_batch_size=G,
            num_generations=G,
            max_completion_length=C,
            max_steps=steps + 1,
            learning_rate=1e-5,
            beta=GRPOConfig().kl_coef,
            temperature=1.0,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            generation_kwargs={"min_new_tokens": C},  # every rollout C tokens, as ours
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=hf_model,
            reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
            args=config,
            train_dataset=Dataset.from_list([{"prompt": prompt}] * (steps + 1)),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    trl = float(np.mean(timer.times[1:]))  # the first step warms up
    return [
        {"system": "grouprank-jax (shared prefix)", "seconds_per_step": ours, "time_vs_ours": 1.0},
        {"system": "TRL 1.16 GRPOTrainer (PyTorch)", "seconds_per_step": trl, "time_vs_ours": trl / ours},
    ]


def _print_table(results: list[dict]) -> None:
    cols = ["layout", "rows", "tokens_computed", "seconds_per_update", "time_vs_shared", "temp_mb", "temp_vs_shared"]
    cols += ["achieved_gflop_per_s", "loss", "grad_norm"] + (["mfu"] if results[0]["mfu"] is not None else [])
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    results = run_bench(args)
    _print_table(results)
    print("losses and gradient norms agree across the two layouts")
    trl = []
    if args.compare_trl:
        trl = compare_trl(args)
        print("whole GRPO step (1 prompt):")
        for r in trl:
            print(f"  {r['system']:<32} {r['seconds_per_step']:.3f} s/step  x{r['time_vs_ours']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "trl": trl}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
