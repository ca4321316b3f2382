"""Test-wide setup: 8 fake CPU devices so sharding tests run on a real multi-device mesh."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def pytest_sessionstart(session):
    import jax

    # Sharding tests compare 8 devices with 1; a missing flag must fail loudly, not skip them.
    if jax.device_count() < 8:
        raise pytest.UsageError(f"tests need 8 (fake CPU) devices, got {jax.device_count()}; was jax imported before conftest?")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    # ../shared sits beside every checkout and CI's clone: absence is an error under CI, and a
    # skip only for someone running the tests from a lone copy of the repo.
    if not SHARED_DATA.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is not present (CI provides ../shared beside the clone)")
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA
