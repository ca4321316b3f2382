"""``grouprank import-hf`` and ``grouprank export-hf``: HF safetensors <-> Orbax checkpoints.

Both run on the host CPU (``parallel.host_mesh``): a 32B model in fp32 does not fit one
accelerator chip, and the conversion itself is host work (safetensors are written from host
memory)."""

from __future__ import annotations

import jax.numpy as jnp

from grouprank_jax.parallel import host_mesh
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.weights import load_hf, save_hf
from grouprank_jax.weights.loading import load_model
from grouprank_jax.weights.orbax_io import save_params


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-hf",
        help="convert a local HF Qwen2 directory to an Orbax checkpoint",
        epilog="example: grouprank import-hf --hf ~/models/Qwen2.5-7B-Instruct --out ckpt/qwen7b",
    )
    p.add_argument("--hf", required=True, help="local HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run_import)

    p = subparsers.add_parser(
        "export-hf",
        help="write a checkpoint as a HF Qwen2 directory (LoRA merged)",
        epilog="example: grouprank export-hf --checkpoint runs/grpo_7b --out export/grpo_7b --dtype bfloat16",
    )
    p.add_argument(
        "--checkpoint", required=True, help="a grouprank checkpoint (import-hf output or a training run dir)"
    )
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--step", type=int, default=None, help="training step to export (default: latest)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="stored dtype (default: as trained)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the bundled Qwen2.5 one)")
    p.set_defaults(func=run_export)


def run_import(args) -> int:
    model = load_hf(args.hf, dtype=jnp.dtype(args.dtype), mesh=host_mesh())
    out = save_params(model, args.out)
    print(f"imported {args.hf} -> {out} ({model.cfg.num_params / 1e6:.1f}M params)")
    return 0


def run_export(args) -> int:
    model = load_model(args.checkpoint, step=args.step, mesh=host_mesh())
    tokenizer = load_tokenizer(args.tokenizer)
    out = save_hf(
        model, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3), tokenizer=tokenizer, dtype=args.dtype
    )
    print(f"exported {args.checkpoint} -> {out}")
    return 0
