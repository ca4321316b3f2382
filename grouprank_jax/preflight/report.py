"""What ``grouprank compile`` reports: per-chip memory of each compiled program from TPU XLA's
``memory_analysis()``, whether it fits the chip, the planner's estimate beside it, and what to
change when it does not fit (the config keys that size each program)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from grouprank_jax.preflight.topology import GIB, Topology

# The config keys that size each function: what a compile error or an out-of-memory points at.
CONFIG_KEYS = {
    "sft_step": ("sft.per_device_batch", "sft.max_seq_len", "model.remat", "mesh"),
    "grpo_update": (
        "grpo.micro_batch_rows",
        "grpo.mini_batch_prompts",
        "grpo.max_prompt_len",
        "grpo.max_response_len",
        "grpo.shared_prefix",
        "model.remat",
        "mesh",
    ),
    "grpo_ref_logprobs": (
        "grpo.micro_batch_rows",
        "grpo.max_prompt_len",
        "grpo.max_response_len",
        "grpo.shared_prefix",
        "mesh",
    ),
    "sampler_prefill": ("grpo.global_batch_prompts", "grpo.max_prompt_len", "mesh"),
    "sampler_decode": (
        "grpo.global_batch_prompts",
        "grpo.rollouts_per_prompt",
        "grpo.max_prompt_len",
        "grpo.max_response_len",
        "grpo.shared_prefix_sampling",
        "mesh",
    ),
}


@dataclasses.dataclass(frozen=True)
class CompiledFunction:
    name: str
    shapes: str  # what it was compiled for, in words
    seconds: float  # lower + compile wall time on this host
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs written into donated argument buffers
    temp_bytes: int = 0
    code_bytes: int = 0
    resident_bytes: int = 0  # on the chip during this function, not among its arguments
    error: str | None = None
    hlo: str | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def xla_bytes(self) -> int:
        """Per-chip bytes of this program's buffers (donated outputs counted once): what XLA holds
        against the chip's HBM when it admits a program. Generated code is reported apart."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def total_bytes(self) -> int:
        return self.xla_bytes + self.resident_bytes


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: Topology
    mesh_shape: dict
    functions: tuple[CompiledFunction, ...]
    estimates: dict  # function name -> the planner's per-chip bytes

    @property
    def hbm_bytes(self) -> float:
        chip = self.topology.chip
        return (chip.xla_hbm_gib or chip.hbm_gib) * GIB

    def fits(self, fn: CompiledFunction) -> bool:
        return fn.ok and fn.total_bytes <= self.hbm_bytes

    @property
    def ok(self) -> bool:
        return all(self.fits(f) for f in self.functions)

    def failures(self) -> list[str]:
        out = []
        for f in self.functions:
            keys = ", ".join(CONFIG_KEYS[f.name])
            if not f.ok:
                hint = (
                    "model.attention_impl"
                    if any(w in f.error.lower() for w in ("mosaic", "pallas", "splash"))
                    else keys
                )
                out.append(f"{f.name}: compile failed ({_first_line(f.error)}); look at {hint}")
            elif not self.fits(f):
                out.append(
                    f"{f.name}: needs {f.total_bytes / GIB:.2f} GiB per chip of {self.hbm_bytes / GIB:.2f} "
                    f"GiB HBM; shrink it with {keys}"
                )
        return out

    def table(self) -> str:
        t = self.topology
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"topology {t.name}: {t.num_devices} x {t.chip.name} ({self.hbm_bytes / GIB:g} GiB usable HBM per XLA), "
            f"{t.num_processes} hosts; mesh {mesh}",
            "",
            "| function | shapes | compile s | args | out | temp | code | resident | total GiB/chip | "
            "fits | plan GiB | plan / XLA |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for f in self.functions:
            est = self.estimates.get(f.name)
            if not f.ok:
                lines.append(
                    f"| {f.name} | {f.shapes} | {f.seconds:.1f} | - | - | - | - | - | - | COMPILE ERROR | "
                    f"{'-' if est is None else f'{est / GIB:.2f}'} | - |"
                )
                continue
            gib = lambda x: f"{x / GIB:.2f}"
            ratio = "-" if est is None else f"{est / f.xla_bytes:.2f}"
            lines.append(
                f"| {f.name} | {f.shapes} | {f.seconds:.1f} | {gib(f.argument_bytes)} "
                f"| {gib(f.output_bytes - f.alias_bytes)} "
                f"| {gib(f.temp_bytes)} | {gib(f.code_bytes)} | {gib(f.resident_bytes)} | {gib(f.total_bytes)} | "
                f"{'yes' if self.fits(f) else 'NO'} | {'-' if est is None else gib(est)} | {ratio} |"
            )
        lines.append("")
        lines += [f"FAILED: {msg}" for msg in self.failures()] or ["OK: every function compiles and fits"]
        return "\n".join(lines)


def _first_line(text: str) -> str:
    line = next((x for x in text.splitlines() if x.strip()), text)
    return line[:300]


def dump_hlo(report: CompileReport, directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for f in report.functions:
        if f.hlo is not None:
            path = directory / f"{f.name}.hlo.txt"
            path.write_text(f.hlo)
            written.append(path)
    return written
