"""``grouprank sft`` and ``grouprank grpo``: run a stage from a YAML run config.

    grouprank sft --config configs/sft_qwen2.5-7b_v5p-64.yaml run_dir=/tmp/gcs/runs/sft7b
    grouprank grpo --config configs/grpo_qwen2.5-7b_v5p-64.yaml init_from=/tmp/gcs/runs/sft7b

Run directories are file-system paths; on a pod, a bucket mounted at the same path on every
host (gcsfuse) keeps checkpoints beyond the VMs. A ``gs://`` URL is refused with that advice.

Overrides are ``section.field=value`` (YAML scalars). A run resumes from the latest checkpoint
in its ``run_dir``; SIGTERM (TPU preemption) finishes the step, saves and exits 0.
"""

from __future__ import annotations

import jax

from grouprank_jax.config.run import load_run_config
from grouprank_jax.metrics_log import plot_run
from grouprank_jax.parallel.distributed import initialize_distributed
from grouprank_jax.parallel.mesh import make_mesh
from grouprank_jax.rl.trainer import train_grpo
from grouprank_jax.sft.trainer import train_sft


def register(subparsers) -> None:
    for name, help_text in (
        ("sft", "supervised fine-tuning on GroupRank/chat records"),
        ("grpo", "GRPO with the GroupRank heterogeneous reward"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=__doc__)
        p.add_argument("--config", required=True, help="run config YAML (see configs/)")
        p.add_argument("--max-steps", type=int, default=None, help="cap the number of steps")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides")
        p.set_defaults(func=run, stage=name)


def run(args) -> int:

    initialize_distributed()
    cfg = load_run_config(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh)
    if args.stage == "sft":
        result = train_sft(cfg, mesh=mesh, max_steps=args.max_steps, progress=not args.no_progress)
    else:
        result = train_grpo(cfg, mesh=mesh, max_steps=args.max_steps, progress=not args.no_progress)

    if jax.process_index() == 0 and result.metrics:
        png = plot_run(result.run_dir)
        print(f"{args.stage}: finished at step {result.step}; curves: {png}")
    return 0
