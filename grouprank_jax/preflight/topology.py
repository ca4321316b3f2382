"""Accelerator topologies by name (``v5p-64``, ``v6e-256x2``, ``2x8xh200``) and, for TPUs, the
devices of the real slice described on any host (no TPU needed).

``parse_topology`` turns a name into chips, hosts and slices (what ``grouprank plan`` sizes
against). ``topology_devices`` asks libtpu for the devices of that slice through
``jax.experimental.topologies`` so that ``grouprank compile`` can lower and compile the real
programs for it from a CPU machine (MaxText's ``train_compile.py`` idea). Run such processes
with ``JAX_PLATFORMS=cpu``: with libtpu installed and no TPU attached, initialising the default
backend otherwise spends ~11 s probing for a TPU.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re

from jax.experimental import topologies

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float
    platform: str  # "tpu" | "gpu" | "cpu": picks the attention kernel the model will use
    # What TPU XLA itself reports as usable ("available HBM" in its out-of-memory errors): the
    # limit a compiled program is held to. None where XLA cannot be asked from a CPU host.
    xla_hbm_gib: float | None = None


# HBM per chip as JAX reports it. v4 / v5p names count TensorCores (2 per chip, one JAX device per
# chip); v5e / v6e names count chips. GPU figures are nvidia-smi's totals (143,771 / 81,559 MiB).
# xla_hbm_gib: read off libtpu 0.0.42.1's compile errors for each generation.
CHIPS = {
    "v4": Chip("v4", 32.0, "tpu", 30.75),
    "v5e": Chip("v5e", 16.0, "tpu", 15.75),
    "v5p": Chip("v5p", 95.0, "tpu", 95.74),
    "v6e": Chip("v6e", 32.0, "tpu", 31.25),
    "h100": Chip("h100-80g", 79.6, "gpu"),
    "h200": Chip("h200-141g", 140.4, "gpu"),
    "cpu": Chip("cpu", 16.0, "cpu"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """``hosts`` x ``chips_per_host`` chips per slice, ``num_slices`` slices (one process per host)."""

    name: str
    chip: Chip
    chips_per_host: int
    hosts: int
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        return self.chips_per_host * self.hosts * self.num_slices

    @property
    def num_processes(self) -> int:
        return self.hosts * self.num_slices

    @property
    def chips_per_slice(self) -> int:
        return self.chips_per_host * self.hosts


def parse_topology(text: str) -> Topology:
    """``v5p-64``, ``v4-8``, ``v5e-256``, ``v6e-256x2`` (two slices), ``2x8xh200``, ``1x8xh100``.

    Assumptions: v4/v5p hosts hold 4 chips; v5e/v6e slices of up to 8 chips are one host
    (v5e-8/v6e-8 are single 8-chip VMs), larger ones are 4-chip hosts.
    """
    s = text.strip().lower()
    gpu = re.fullmatch(r"(\d+)x(\d+)x(h100|h200)(?:-\d+g)?", s)
    if gpu:
        hosts, per_host, kind = int(gpu[1]), int(gpu[2]), gpu[3]
        return Topology(text, CHIPS[kind], per_host, hosts)
    tpu = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)(?:x(\d+))?", s)
    if not tpu:
        raise ValueError(
            f"topology {text!r} not understood; use e.g. v5p-64, v4-8, v5e-256, v6e-256x2 (slices) or 2x8xh200"
        )
    kind = "v5e" if tpu[1] == "v5litepod" else tpu[1]
    n, slices = int(tpu[2]), int(tpu[3] or 1)
    if kind in ("v4", "v5p"):
        if n < 8 or n % 8:
            raise ValueError(f"{text}: {kind}-N counts TensorCores (2 per chip) in multiples of 8")
        chips = n // 2
        per_host = 4
    else:
        chips = n
        per_host = chips if chips <= 8 else 4
        if chips > 8 and chips % 4:
            raise ValueError(f"{text}: multi-host {kind} slices hold a multiple of 4 chips")
    return Topology(text, CHIPS[kind], per_host, chips // per_host, slices)


# ---- TPU slices as libtpu describes them ---------------------------------------------------------

# libtpu's names of the generations; v4 runs as one device per chip ("megacore"), like on a VM.
_LIBTPU_NAME = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}
_CHIP_CONFIG = {"v4": "megacore"}


def slice_shape(chip: str, chips: int) -> tuple[int, ...]:
    """The physical chip grid of a standard slice: 3-D for v4/v5p (v5p-64 = 32 chips = 2x4x4,
    v5p-256 = 4x4x8), 2-D for v5e/v6e (v5e-8 = 2x4, v6e-256 = 16x16). Grown from the smallest
    slice by doubling the shortest side (the last one on ties), which reproduces Cloud TPU's
    published shapes for power-of-two slices."""
    if chips & (chips - 1):
        raise ValueError(
            f"{chips} {chip} chips is not a power of two: no standard slice shape; "
            "name the grid explicitly, e.g. --topology v5p:4x4x2"
        )
    three_d = chip in ("v4", "v5p")
    dims = [2, 2, 1] if three_d else [1, 1]
    if three_d and chips < 4:
        raise ValueError(f"{chip} slices start at 4 chips (e.g. v5p-8)")
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def libtpu_topology_name(topology: Topology) -> str:
    chip = topology.chip.name
    if chip not in _LIBTPU_NAME:
        raise ValueError(f"{topology.name}: not a TPU topology")
    return f"{_LIBTPU_NAME[chip]}:" + "x".join(map(str, slice_shape(chip, topology.chips_per_slice)))


def topology_devices(topology: Topology) -> list:
    """The JAX devices of ``topology`` (every host's chips, every slice), for AOT compilation.

    TPU only: XLA cannot describe a GPU cluster without its CUDA runtime (``topology not
    implemented for cuda`` on a host without one).
    """
    if topology.chip.platform != "tpu":
        raise NotImplementedError(
            f"{topology.name}: XLA can describe TPU slices from any host, but not GPUs without a CUDA "
            "runtime; compile on a GPU node instead, or use `grouprank plan` for the analytical check"
        )
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; describing a
    # slice drives nothing, and compiles (CI's parallel test workers, a compile beside a running
    # job) must not exclude each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
        # No TPU attached: libtpu would look for this VM's TPU metadata and print a screenful of
        # warnings about it on every start. Describing a slice needs none of it.
        for key, value in (
            ("TPU_SKIP_MDS_QUERY", "1"),
            ("TPU_ACCELERATOR_TYPE", "v5p-8"),
            ("TPU_WORKER_HOSTNAMES", "localhost"),
            ("TPU_STDERR_LOG_LEVEL", "3"),
            ("TPU_MIN_LOG_LEVEL", "3"),
        ):
            os.environ.setdefault(key, value)
    chip = topology.chip.name
    per_host = (
        (2, 4, 1)
        if topology.chips_per_host == 8
        else (2, 2, 1)
        if topology.chips_per_host == 4
        else ((1, 1, 1) if topology.chips_per_host == 1 else (1, 2, 1))
    )
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=libtpu_topology_name(topology),
            chip_config_name=_CHIP_CONFIG.get(chip, "default"),
            chips_per_host_bounds=per_host,
            num_slices=topology.num_slices,
        )
    except RuntimeError as err:
        hint = (
            "install the TPU extra (pip install 'grouprank-jax[tpu]'), which brings libtpu"
            if importlib.util.find_spec("libtpu") is None
            else "check the topology name"
        )
        raise RuntimeError(
            f"libtpu cannot describe {topology.name} ({libtpu_topology_name(topology)}): {str(err)[:300]}; {hint}"
        ) from err
    devices = list(desc.devices)
    if len(devices) != topology.num_devices:
        raise RuntimeError(
            f"libtpu describes {len(devices)} devices for {topology.name}, the planner expects {topology.num_devices}"
        )
    return devices
