"""``grouprank plan --config CONFIG --topology TOPOLOGY [key=value ...]``: pre-flight check.

Prints the per-chip memory table and every sharding / batch violation; exits 1 when the run
would not shard cleanly or fit, 2 when the inputs themselves are wrong. Runs on a laptop: the
model is built abstractly, nothing is allocated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grouprank_jax.config.run import load_run_config
from grouprank_jax.preflight.plan import PlanOptions, plan
from grouprank_jax.preflight.topology import parse_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="check a run config against a topology (sharding, batches, HBM)")
    p.add_argument("--config", required=True, metavar="YAML", help="run config (configs/*.yaml)")
    p.add_argument("--topology", required=True, help="e.g. v5p-64, v4-8, v6e-256x2, 2x8xh200")
    p.add_argument(
        "--stage",
        choices=("auto", "sft", "grpo", "both"),
        default="auto",
        help="stage to plan; auto: from the config file name (sft_*/grpo_*), else both",
    )
    p.add_argument(
        "--usable-fraction",
        type=float,
        default=None,
        help="fraction of HBM a program may use (default: TPU XLA's own limit on TPU, 0.9 on GPU)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mesh.tensor=4")
    p.set_defaults(func=run)


def stages_for(config_path: str, stage: str) -> tuple[str, ...]:
    if stage == "both":
        return ("sft", "grpo")
    if stage != "auto":
        return (stage,)
    name = Path(config_path).name.lower()
    found = tuple(s for s in ("sft", "grpo") if s in name)
    return found if len(found) == 1 else ("sft", "grpo")


def run(args: argparse.Namespace) -> int:
    # Imported here so that ``grouprank --help`` does not import flax.

    cfg = load_run_config(args.config, args.overrides)
    topology = parse_topology(args.topology)
    options = PlanOptions(usable_fraction=args.usable_fraction)
    report = plan(cfg, topology, stages_for(args.config, args.stage), options)
    print(report.table())
    return 0 if report.ok else 1
