"""Test-wide setup: 8 fake CPU devices so sharding tests run on a real multi-device mesh."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent XLA cache for the whole suite (xdist workers and the CLI subprocesses the
# tests start): the same tiny-model programs are compiled by many tests and by every restart of
# the resume tests. Its key is JAX's (HLO, options, devices, versions), so a hit is the same
# executable a compile would give; CI starts from a clean clone, i.e. an empty cache.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla-compile-cache")
)

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def pytest_sessionstart(session):
    import jax

    # Sharding tests compare 8 devices with 1; a missing flag must fail loudly, not skip them.
    if jax.device_count() < 8:
        raise pytest.UsageError(
            f"tests need 8 (fake CPU) devices, got {jax.device_count()}; was jax imported before conftest?"
        )


# Tests that read ../shared (real evaluation data, the paper notes) or an oracle package fail
# when it is missing: a missing oracle must never turn into a silently skipped check. Someone
# running a lone copy of the repository can opt into skips with GROUPRANK_TESTS_ALLOW_SKIP=1.
ALLOW_SKIP = os.environ.get("GROUPRANK_TESTS_ALLOW_SKIP") == "1"


def missing(reason: str):
    """Fail (default, and always under CI) or skip (opt-in) a test whose input is absent."""
    if ALLOW_SKIP and not os.environ.get("CI"):
        pytest.skip(reason)
    pytest.fail(f"{reason} (set GROUPRANK_TESTS_ALLOW_SKIP=1 to skip such tests outside CI)")


def shared_path(*parts: str) -> Path:
    """A file or directory under ../shared that the calling test needs."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        missing(f"{path} is not present (../shared sits beside every checkout and CI's clone)")
    return path


def require_module(name: str):
    """Import an oracle package of the test extra, or fail."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"oracle package {name!r} is not installed ({err}); pip install -e '.[test]'")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path("data")
