"""Where log records go: a quiet terminal and a complete log file per run.

The terminal shows our own INFO lines (one-line stage messages), anyone's warnings and errors,
and the progress bars; third-party INFO (Orbax's checkpoint-manager dumps, absl, JAX's backend
probing) stays off it. ``run_log(path)`` additionally writes every record at INFO and above,
third-party ones included, to the run directory's ``run.log``. ``-v`` puts everything
(DEBUG included) on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

OURS = "grouprank_jax"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Quiet(logging.Filter):
    """Our records at INFO and above; everyone else's at WARNING and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        return record.levelno >= (logging.INFO if ours else logging.WARNING)


def configure_console(verbose: bool = False) -> None:
    """The terminal handler of a ``grouprank`` process (called once by the CLI)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_grouprank_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._grouprank_console = True  # type: ignore[attr-defined]
    if verbose:
        handler.setFormatter(logging.Formatter(_FORMAT))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_Quiet())
    root.addHandler(handler)
    # absl (Orbax logs through it) installs its own stderr handler on first use; route it to ours.
    logging.getLogger("absl").propagate = True


@contextlib.contextmanager
def run_log(path: str | Path):
    """Append every INFO+ record (third-party included) to ``path`` inside the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    previous = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
