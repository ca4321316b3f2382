"""``grouprank plot RUN_DIR [--out PNG]``: render a run's metrics.jsonl into one PNG grid."""

from __future__ import annotations

import argparse

from grouprank_jax.metrics_log import plot_run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="plot the metric curves of a training run into a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument("--out", metavar="PNG", default=None, help="output image (default: RUN_DIR/metrics.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out)
    print(out)
    return 0
