"""The ``grouprank`` command line. Each subcommand lives in ``grouprank_jax/commands/<name>.py``
and exposes ``register(subparsers)`` (adds its parser and sets ``func``); modules are imported
lazily so that ``grouprank eval`` never pays for importing the model stack."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module; the order is the order of ``grouprank --help``.
COMMANDS: dict[str, str] = {
    "demo": "grouprank_jax.commands.demo",
    "import-hf": "grouprank_jax.commands.convert",
    "export-hf": "grouprank_jax.commands.convert",
    "generate": "grouprank_jax.commands.generate",
    "retrieve": "grouprank_jax.commands.retrieve",
    "rerank": "grouprank_jax.commands.rerank",
    "eval": "grouprank_jax.commands.eval",
    "sft": "grouprank_jax.commands.train",
    "grpo": "grouprank_jax.commands.train",
    "plot": "grouprank_jax.commands.plot",
    "plan": "grouprank_jax.commands.plan",
    "compile": "grouprank_jax.commands.compile",
    "bench": "grouprank_jax.commands.bench",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grouprank", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    registered: set[str] = set()
    for name, module_name in COMMANDS.items():
        if module_name in registered:
            continue
        # Only import the module of the requested command (fast start); --help imports all.
        if wanted is not None and wanted in COMMANDS and COMMANDS[wanted] != module_name:
            sub.add_parser(name, help=f"(see grouprank {name} --help)")
            continue
        module = importlib.import_module(module_name)
        module.register(sub)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
