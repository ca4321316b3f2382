"""``grouprank``: train, evaluate and ship GroupRank rerankers (arXiv 2511.11653) in JAX.

Commands load lazily (``grouprank eval`` never imports the model stack). One error policy for all
of them lives here: a mistake the user can fix prints ``grouprank <command>: error: <message>``
and exits 2; anything unexpected prints its type and message with a hint to rerun with ``-v``
(which shows the traceback) and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import logging
import os
import sys
import traceback

from grouprank_jax import __version__
from grouprank_jax.compile_cache import enable_compile_cache
from grouprank_jax.errors import is_user_error, one_line
from grouprank_jax.log_setup import configure_console

log = logging.getLogger(__name__)

# Commands by job: (name, module, one example). The order is the order of ``grouprank --help``.
GROUPS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("start here", (("demo", "grouprank_jax.commands.demo", "grouprank demo"),)),
    (
        "data",
        (
            ("retrieve", "grouprank_jax.commands.retrieve", "grouprank retrieve --data beir/scifact --out bm25.run"),
            ("synth", "grouprank_jax.commands.synth", "grouprank synth --data ... --out ... --pointwise-url ..."),
        ),
    ),
    (
        "train",
        (
            ("sft", "grouprank_jax.commands.train", "grouprank sft --config configs/sft_qwen2.5-7b_v5p-64.yaml"),
            ("grpo", "grouprank_jax.commands.train", "grouprank grpo --config configs/grpo_qwen2.5-7b_v5p-64.yaml"),
            ("plot", "grouprank_jax.commands.plot", "grouprank plot runs/grpo_7b"),
        ),
    ),
    (
        "evaluate",
        (
            (
                "rerank",
                "grouprank_jax.commands.rerank",
                "grouprank rerank --model export/grpo_7b --data dl19.json --out reranked.run",
            ),
            ("eval", "grouprank_jax.commands.eval", "grouprank eval --run reranked.run --qrels dl19.qrels"),
            (
                "generate",
                "grouprank_jax.commands.generate",
                "grouprank generate --model export/grpo_7b --prompts p.jsonl --out o.jsonl",
            ),
        ),
    ),
    ("serve", (("serve", "grouprank_jax.commands.serve", "grouprank serve --model export/grpo_7b --port 8000"),)),
    (
        "convert",
        (
            (
                "import-hf",
                "grouprank_jax.commands.convert",
                "grouprank import-hf --hf Qwen2.5-7B-Instruct --out ckpt/qwen7b",
            ),
            (
                "export-hf",
                "grouprank_jax.commands.convert",
                "grouprank export-hf --checkpoint runs/grpo_7b --out export/grpo_7b",
            ),
        ),
    ),
    (
        "scale-out",
        (
            (
                "plan",
                "grouprank_jax.commands.plan",
                "grouprank plan --config configs/grpo_qwen2.5-7b_v5p-64.yaml --topology v5p-64",
            ),
            (
                "compile",
                "grouprank_jax.commands.compile",
                "grouprank compile --config configs/grpo_qwen2.5-7b_v5p-64.yaml --topology v5p-64",
            ),
        ),
    ),
    (
        "benchmark",
        (("bench", "grouprank_jax.commands.bench", "grouprank bench sampling --preset tiny --batch 1,8 --compare hf"),),
    ),
)
COMMANDS: dict[str, str] = {name: module for _, cmds in GROUPS for name, module, _ in cmds}
EXAMPLES: dict[str, str] = {name: example for _, cmds in GROUPS for name, _, example in cmds}


def _overview() -> str:
    lines = ["commands (grouprank COMMAND --help for each):"]
    for group, cmds in GROUPS:
        lines.append(f"  {group}:")
        for name, _, example in cmds:
            lines.append(f"    {name:<10} e.g. {example}")
    lines.append("\nmistakes print one line and exit 2; -v shows tracebacks and every log record")
    return "\n".join(lines)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouprank",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GroupRank rerankers in JAX: SFT and GRPO training on TPU pods and GPU clusters, groupwise "
        "reranking and evaluation, Hugging Face import/export, pre-flight planning and AOT compile for "
        "a TPU slice, benchmarks.",
        epilog=_overview(),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks and every log record on the terminal")
    parser.add_argument("--version", action="version", version=f"grouprank-jax {__version__}")
    # The grouped overview (epilog) lists the commands; argparse's flat list would repeat it.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    sub.required = True
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv else None
    registered: set[str] = set()
    for name, module_name in COMMANDS.items():
        if module_name in registered:
            continue
        # Only the module of the requested command is imported (fast start); --help imports all.
        if wanted in COMMANDS and COMMANDS[wanted] != module_name:
            sub.add_parser(name, help=f"(see grouprank {name} --help)")
            continue
        importlib.import_module(module_name).register(sub)
        registered.add(module_name)
    for name, action in sub.choices.items():
        if not action.epilog and name in EXAMPLES:
            action.epilog = f"example: {EXAMPLES[name]}"
    return parser


def _skip_absent_tpu() -> None:
    """With libtpu installed but no TPU attached (a CPU or GPU machine with the ``tpu`` extra),
    JAX would spend ~11 s probing for a TPU and libtpu would print a screenful about it. Pick the
    platforms that are there instead, unless the user chose (``JAX_PLATFORMS``)."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return  # a TPU VM
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _skip_absent_tpu()
    command = next((a for a in argv if not a.startswith("-")), "grouprank")
    if command != "compile":
        # `grouprank compile` builds TPU executables on a host without a TPU: JAX can write
        # them to the cache but not load them back there (it warns and compiles again).
        enable_compile_cache()
    verbose = "-v" in argv or "--verbose" in argv
    configure_console(verbose)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"grouprank {command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise  # argparse's own usage errors (exit 2) and --help / --version (exit 0)
    except Exception as err:
        if verbose:
            traceback.print_exc()
        if is_user_error(err):
            print(f"grouprank {command}: error: {one_line(err)}", file=sys.stderr)
            return 2
        print(
            f"grouprank {command}: unexpected {type(err).__name__}: {one_line(err)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
