"""Training throughput: step time, tokens/s, peak memory and MFU of the SFT step.

    grouprank bench train --preset tiny --batch 8 --seq-len 512 --out bench_train.json
    grouprank bench train --loss-memory          # blockwise vs naive LM-head loss memory

MFU counts FLOPs as ``preflight/flops.py`` does (MaxText's count: 6 x matmul params x tokens
plus causal attention; 4 x with ``--lora``).
Peak memory: the device's ``peak_bytes_in_use`` where the backend reports it (GPU/TPU), else
the compiled step's ``memory_analysis()`` (arguments + outputs + temporaries).
Multi-process (``launch/local_multiprocess.sh``, a pod): ``--batch`` is the global batch, each
process feeds its share; tokens/s is global, ``tokens_per_s_per_device`` per chip.
``run_bench(args)`` is the entry point for ``grouprank bench train``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from grouprank_jax.config import MeshConfig, model_preset
from grouprank_jax.models import create_model
from grouprank_jax.models.token_logprobs import naive_token_logprobs, token_logprobs
from grouprank_jax.parallel import make_mesh
from grouprank_jax.preflight.flops import mfu, training_flops
from grouprank_jax.sft.step import make_sft_step
from grouprank_jax.training.state import init_train_state, make_optimizer, shard_batch
from grouprank_jax.weights.loading import with_lora


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="global rows per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32 master weights)")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device bf16 peak (default: the chip's, preflight/flops.py; none on CPU)",
    )
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
    p.add_argument("--loss-memory", action="store_true", help="only compare blockwise vs naive loss memory")
    p.add_argument("--out")
    return p


def _peak_memory(compiled) -> tuple[float, str]:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    return float(total), "compiled memory_analysis"


def run_bench(args) -> dict:
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    cfg = model_preset(
        args.preset, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, attention_impl=args.attention
    )
    model = create_model(cfg, mesh=mesh)
    if args.lora:
        model = with_lora(model, args.lora, 2.0 * args.lora, cfg.lora_targets, mesh, 0)
    tx = make_optimizer(1e-5, 100)
    state = init_train_state(model, tx, lora=bool(args.lora))
    step = make_sft_step(state.graphdef, tx, args.loss_chunk)
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq_len
    processes = jax.process_count()
    if b % processes:
        raise ValueError(f"--batch {b} does not split over {processes} processes")
    local = b // processes  # each process feeds its own rows of the global batch
    host = {
        "input_ids": rng.integers(0, cfg.vocab_size, (1, local, t)).astype(np.int32),
        "targets": rng.integers(0, cfg.vocab_size, (1, local, t)).astype(np.int32),
        "loss_mask": np.ones((1, local, t), np.int32),
        "segment_ids": np.ones((1, local, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, local, t)).copy(),
    }
    batch = shard_batch(host, mesh, batch_axis=1)
    trainable, opt_state = state.trainable, state.opt_state
    t0 = time.perf_counter()
    compiled = step.lower(trainable, state.frozen, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    trainable, opt_state, metrics = step(trainable, state.frozen, opt_state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, state.frozen, opt_state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    flops = training_flops(cfg, b, t, bool(args.lora))
    mem, mem_source = _peak_memory(compiled)
    row = {
        "preset": args.preset,
        "params": cfg.num_params,
        "batch": b,
        "seq_len": t,
        "dtype": args.dtype,
        "lora_rank": args.lora,
        "remat": args.remat,
        "processes": processes,
        "devices": jax.device_count(),
        "device": str(jax.devices()[0].device_kind),
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": b * t / step_s,
        "tokens_per_s_per_device": b * t / step_s / jax.device_count(),
        "tflops_per_s_per_device": flops / step_s / 1e12 / jax.device_count(),
        "peak_memory_gib": mem / 2**30,
        "memory_source": mem_source,
        "loss": float(metrics["loss"]),
    }
    utilisation = mfu(flops, step_s, jax.device_count(), row["device"], args.peak_tflops)
    if utilisation is not None:
        row["mfu"] = utilisation
    return row


def loss_memory(vocab: int = 151936, hidden: int = 896, tokens: int = 8192, chunk: int = 1024) -> dict:
    """Compiled temp memory of loss+grad: blockwise LM head vs full [tokens, vocab] logits."""
    head = jax.ShapeDtypeStruct((hidden, vocab), jnp.float32)
    h = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
    t = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def temp(fn):
        g = jax.jit(jax.grad(lambda w, x, y: -jnp.sum(fn(w, x, y)[0]), argnums=(0, 1)))
        return g.lower(head, h, t).compile().memory_analysis().temp_size_in_bytes / 2**30

    return {
        "tokens": tokens,
        "vocab": vocab,
        "hidden": hidden,
        "chunk": chunk,
        "blockwise_gib": temp(lambda w, x, y: token_logprobs(w, x, y, chunk, with_entropy=False)),
        "naive_gib": temp(naive_token_logprobs),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    primary = jax.process_index() == 0
    if args.loss_memory:
        result = loss_memory()
        print(
            f"| tokens | vocab | blockwise loss+grad temp | naive |\n|---|---|---|---|\n"
            f"| {result['tokens']} | {result['vocab']} | {result['blockwise_gib']:.2f} GiB "
            f"| {result['naive_gib']:.2f} GiB |"
        )
    else:
        result = run_bench(args)
        keys = [
            "preset",
            "batch",
            "seq_len",
            "dtype",
            "lora_rank",
            "processes",
            "devices",
            "step_s",
            "tokens_per_s",
            "tokens_per_s_per_device",
            "tflops_per_s_per_device",
            "mfu",
            "peak_memory_gib",
            "compile_s",
        ]
        if primary:
            print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
            print(
                "| "
                + " | ".join(
                    f"{result[k]:.4g}" if isinstance(result.get(k), float) else str(result.get(k, "-")) for k in keys
                )
                + " |"
            )
    if args.out and primary:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
