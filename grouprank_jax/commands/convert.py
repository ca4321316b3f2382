"""``grouprank import-hf`` and ``grouprank export-hf``: HF safetensors <-> Orbax checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("import-hf", help="convert a local HF Qwen2 directory to an Orbax checkpoint")
    p.add_argument("--hf", required=True, help="local HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run_import)

    p = subparsers.add_parser("export-hf", help="write a checkpoint as a HF Qwen2 directory (LoRA merged)")
    p.add_argument("--checkpoint", required=True, help="a grouprank checkpoint (import-hf output or a training run dir)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--step", type=int, default=None, help="training step to export (default: latest)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="stored dtype (default: as trained)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the bundled Qwen2.5 one)")
    p.set_defaults(func=run_export)


def run_import(args) -> int:
    import jax.numpy as jnp

    from grouprank_jax.weights import load_hf
    from grouprank_jax.weights.orbax_io import save_params

    model = load_hf(args.hf, dtype=jnp.dtype(args.dtype))
    out = save_params(model, args.out)
    print(f"imported {args.hf} -> {out} ({model.cfg.num_params / 1e6:.1f}M params)")
    return 0


def load_any_checkpoint(path: str | Path, step: int | None = None, mesh=None):
    """A model from an import-hf checkpoint, a training run directory or a HF directory."""
    from grouprank_jax.weights import load_hf
    from grouprank_jax.weights.orbax_io import CONFIG_FILE, load_params

    path = Path(path)
    if (path / CONFIG_FILE).exists() and (path / "params").exists():
        return load_params(path, mesh=mesh)
    if (path / "config.json").exists():
        return load_hf(path, mesh=mesh)
    from grouprank_jax.train_state import load_trained_model

    return load_trained_model(path, step=step, mesh=mesh)


def run_export(args) -> int:
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import save_hf

    model = load_any_checkpoint(args.checkpoint, step=args.step)
    tokenizer = load_tokenizer(args.tokenizer)
    out = save_hf(model, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3), tokenizer=tokenizer, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
