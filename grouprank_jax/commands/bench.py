"""``grouprank bench sampling|train|rerank [args...]``: the benchmark scripts in ``launch/``.

Each prints a table and writes JSON; the arguments are those of the script
(``python launch/bench_<name>.py --help``). ``sampling`` and ``train`` also run as several
processes (e.g. ``launch/local_multiprocess.sh 2 4 grouprank bench train --preset tiny``): the
batch is split over processes, process 0 prints global and per-chip throughput.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = {"sampling": "bench_sampling.py", "train": "bench_train.py", "rerank": "bench_rerank.py"}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="throughput benchmarks (sampling, train, rerank)", description=__doc__)
    p.add_argument("which", choices=sorted(SCRIPTS))
    p.add_argument("script_args", nargs="...", help="arguments passed to the benchmark script")
    p.set_defaults(func=run)


def _load(name: str):
    path = Path(__file__).resolve().parents[2] / "launch" / SCRIPTS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: `grouprank bench` runs from a source checkout (launch/ is not packaged)")
    spec = importlib.util.spec_from_file_location(f"grouprank_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(args) -> int:
    from grouprank_jax.parallel.distributed import initialize_distributed

    initialize_distributed()  # a no-op unless launched as several processes (launch/*.sh, SLURM, TPU pod)
    return int(_load(args.which).main(list(args.script_args)) or 0)
