"""The small real-vocabulary model shape the CPU layout benchmarks share (``shared-prefix``,
``grpo-update``): ``--layers``, ``--hidden``, ``--heads``, ``--kv-heads`` with head_dim 64, an MLP
4x the width, the real 151,936-token vocabulary, random weights (seed 0), fp32."""

from __future__ import annotations

import argparse

from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model


def add_shape_args(p: argparse.ArgumentParser, *, layers: int, kv_heads: int) -> None:
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="query heads (head_dim 64)")
    p.add_argument("--kv-heads", type=int, default=kv_heads)


def model_from_shape_args(args: argparse.Namespace):
    cfg = model_preset(
        "tiny",
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=64,
        intermediate_size=4 * args.hidden,
    )
    return create_model(cfg, seed=0)
