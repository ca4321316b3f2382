"""``grouprank bench NAME [args...]``: throughput benchmarks (NAME: one of ``MODULES`` below).

Each prints a table and writes JSON (``--out``); ``grouprank bench <name> --help`` lists its
arguments. ``sampling`` and ``train`` also run as several processes (e.g.
``launch/local_multiprocess.sh 2 4 grouprank bench train --preset tiny``): the batch is split
over processes, process 0 prints global and per-chip throughput.
"""

from __future__ import annotations

import importlib
import sys

from grouprank_jax.parallel.distributed import initialize_distributed

MODULES = {
    "sampling": "grouprank_jax.bench.sampling",
    "train": "grouprank_jax.bench.train",
    "rerank": "grouprank_jax.bench.rerank",
    "device-suite": "grouprank_jax.bench.device_suite",
    "shared-prefix": "grouprank_jax.bench.shared_prefix",
    "grpo-update": "grouprank_jax.bench.grpo_update",
    "serve": "grouprank_jax.bench.serve",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="throughput benchmarks (sampling, train, rerank, device-suite, shared-prefix, grpo-update, serve)",
        description=__doc__,
        epilog="example: grouprank bench sampling --preset tiny --batch 1,8 --compare hf",
    )
    p.add_argument("which", choices=sorted(MODULES))
    p.add_argument("bench_args", nargs="...", help="arguments of the benchmark (see grouprank bench NAME --help)")
    p.set_defaults(func=run)


def run(args) -> int:
    bench_args = list(args.bench_args)
    if not {"-h", "--help"} & set(bench_args):  # help needs no devices (and prints no device line)
        initialize_distributed()  # a no-op unless launched as several processes (launch/*.sh, SLURM, TPU pod)
    # The module of the chosen benchmark only: each imports its own model stack.
    module = importlib.import_module(MODULES[args.which])
    # argparse names a parser after sys.argv[0]: each benchmark's usage line then reads as typed
    program, sys.argv[0] = sys.argv[0], f"grouprank bench {args.which}"
    try:
        return int(module.main(bench_args) or 0)
    finally:
        sys.argv[0] = program
