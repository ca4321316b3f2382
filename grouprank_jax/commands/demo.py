"""``grouprank demo``: SFT -> GRPO -> rerank + evaluate -> HF export on a tiny Qwen2, on CPU."""

from __future__ import annotations

import dataclasses

from grouprank_jax.demo.run import PRESETS, format_summary, run_demo


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on a tiny model and bundled data (CPU, minutes)")
    p.add_argument("--preset", default="default", choices=["default", "ci"])
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:

    cfg = PRESETS[args.preset]
    if args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    summary = run_demo(cfg, progress=not args.no_progress)
    print(format_summary(summary))
    return 0
