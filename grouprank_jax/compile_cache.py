"""JAX's persistent compilation cache, on by default for every ``grouprank`` command.

A restarted job (preemption, a crash, the next stage of a pipeline) compiles the same programs
again: minutes for a 7B step on a TPU slice. With the cache, XLA's executables are written to
disk once and loaded on the next start; the key is JAX's (the program's HLO, the compile options,
the devices, the jax/jaxlib versions), so a changed config or model simply compiles anew.
MaxText (``jax_cache_dir``) and Levanter do the same.

Where: ``$JAX_COMPILATION_CACHE_DIR`` if set (JAX's own variable; use a shared bucket path to
share the cache across a pod's hosts), else ``~/.cache/grouprank-jax/xla``. ``GROUPRANK_COMPILE_CACHE=0``
turns it off. Only programs that take at least ``jax_persistent_cache_min_compile_time_secs``
(JAX's default, 1 s) to compile are written. ``grouprank compile`` (TPU executables built on a
host without a TPU, which JAX cannot load back there) runs without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_DIR = Path("~/.cache/grouprank-jax/xla")


def compile_cache_dir() -> str | None:
    """The directory the cache uses, or None when it is turned off."""
    if os.environ.get("GROUPRANK_COMPILE_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(DEFAULT_DIR.expanduser())


def enable_compile_cache() -> str | None:
    """Point JAX at the cache directory (before or after jax is imported); returns it."""
    path = compile_cache_dir()
    if path is None:
        return None
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
    else:
        # Read by jax at import: keeps `grouprank --help` from importing jax.
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    return path
