"""``grouprank compile --config RUN.yaml --topology TOPOLOGY [--phase sft|grpo|all] [--dump-hlo DIR]
[key=value ...]``: compile a run's programs for its real TPU slice from any host.

The exact counterpart of ``grouprank plan``: it lowers and compiles the trainers' and the
sampler's own jitted functions (SFT step; GRPO update, reference log-probs, sampler prefill and
decode) over abstract weights with the run's shardings, and prints TPU XLA's per-chip memory
beside the planner's estimate. Needs neither the data nor the weights the config names, only
libtpu (``pip install 'grouprank-jax[tpu]'``). Exits 1 when a function does not compile or does
not fit in HBM, naming it and the config keys that size it.

    grouprank compile --config configs/grpo_qwen2.5-7b_v5p-64.yaml --topology v5p-64
"""

from __future__ import annotations

import os

# This process compiles for a TPU slice it does not run on: keep JAX off the local TPU probe
# (~11 s with libtpu installed and no TPU attached). Set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import sys

from grouprank_jax.commands.plan import stages_for
from grouprank_jax.config.run import load_run_config
from grouprank_jax.errors import UserError
from grouprank_jax.preflight.aot import compile_run
from grouprank_jax.preflight.report import dump_hlo
from grouprank_jax.preflight.topology import parse_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile a run's programs for a TPU topology; per-chip memory from XLA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="YAML", help="run config (configs/*.yaml)")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-64, v5e-8, v6e-256x2")
    p.add_argument(
        "--phase",
        choices=("auto", "sft", "grpo", "all"),
        default="auto",
        help="programs to compile; auto: from the config file name (sft_*/grpo_*), else all",
    )
    p.add_argument("--dump-hlo", metavar="DIR", default=None, help="write each function's optimized HLO text here")
    p.add_argument(
        "--only",
        metavar="NAMES",
        default=None,
        help="comma-separated functions to compile (sft_step, grpo_update, grpo_ref_logprobs, "
        "sampler_prefill, sampler_decode); default: all of the phase",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. grpo.micro_batch_rows=16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    cfg = load_run_config(args.config, args.overrides)
    topology = parse_topology(args.topology)
    phases = stages_for(args.config, "both" if args.phase == "all" else args.phase)

    def progress(fn) -> None:
        status = "ok" if fn.ok else "FAILED"
        print(f"compiled {fn.name} ({fn.shapes}) in {fn.seconds:.1f} s: {status}", file=sys.stderr, flush=True)

    try:
        only = args.only.split(",") if args.only else None
        report = compile_run(cfg, topology, phases, keep_hlo=args.dump_hlo is not None, on_function=progress, only=only)
    except (NotImplementedError, RuntimeError) as err:  # no TPU description for this topology here
        raise UserError(str(err)) from err
    print(report.table())
    if args.dump_hlo:
        for path in dump_hlo(report, args.dump_hlo):
            print(f"wrote {path}")
    return 0 if report.ok else 1
