"""Pre-flight planner: will this run config shard cleanly and fit in HBM on this topology?

``plan(run_config, topology)`` checks, before any chip is paid for, that (1) every sharded
dimension of the real parameter shapes divides its mesh axes (the abstract model is built with
``nnx.eval_shape`` and each Variable's ``logical_axes`` is mapped through the one rules table,
so the check follows the model code), (2) batches divide the batch-sharded axes and the hosts,
and (3) every program the stage compiles fits in ``usable_fraction`` of HBM, by the per-function
estimates of ``preflight/memory.py``. It is instant and analytical; ``grouprank compile`` is the
slow, exact check that asks TPU XLA.
"""

from __future__ import annotations

import dataclasses

from grouprank_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from grouprank_jax.preflight.memory import FunctionEstimate, stage_functions, stage_model
from grouprank_jax.preflight.shapes import divisibility_violations, model_params
from grouprank_jax.preflight.topology import GIB, Topology, parse_topology  # noqa: F401 (re-export)


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    # Fraction of HBM a program may use. None: on TPU the HBM TPU XLA itself admits programs into
    # (95.74 GiB on v5p; the estimates are calibrated to sit at or above XLA's own figures), on
    # GPU 0.9 of nvidia-smi's total (the runtime's buffers and fragmentation take the rest).
    usable_fraction: float | None = None

    def budget(self, chip) -> float:
        if self.usable_fraction is None and chip.xla_hbm_gib is not None:
            return chip.xla_hbm_gib * GIB
        return (0.9 if self.usable_fraction is None else self.usable_fraction) * chip.hbm_gib * GIB


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: str
    functions: tuple[FunctionEstimate, ...]
    budget: float

    @property
    def peak(self) -> float:
        return max(f.total for f in self.functions)

    @property
    def peak_function(self) -> str:
        return max(self.functions, key=lambda f: f.total).name


@dataclasses.dataclass(frozen=True)
class PlanReport:
    topology: Topology
    mesh_shape: dict
    stages: tuple[StagePlan, ...]
    violations: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        t = self.topology
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        out = [
            f"topology {t.name}: {t.num_devices} x {t.chip.name} ({t.chip.hbm_gib:g} GiB), "
            f"{t.num_processes} processes, {t.num_slices} slice(s); mesh {mesh}"
        ]
        for s in self.stages:
            out.append(f"\n[{s.stage}] per-chip memory of each compiled function (GiB)")
            for f in s.functions:
                out.append(f"  {f.name}")
                for x in f.lines:
                    out.append(f"    {x.name:<28} {x.bytes / GIB:9.2f}  {x.note}")
                if f.resident:
                    out.append(f"    {'+ resident':<28} {f.resident / GIB:9.2f}  {f.resident_note}")
                out.append(f"    {'= total':<28} {f.total / GIB:9.2f}")
            verdict = "fits" if s.peak <= s.budget else "DOES NOT FIT"
            out.append(
                f"  {'peak (' + s.peak_function + ')':<30} {s.peak / GIB:9.2f}  "
                f"budget {s.budget / GIB:.2f} -> {verdict}"
            )
        out += [f"\nWARNING: {w}" for w in self.warnings] + [f"VIOLATION: {v}" for v in self.violations]
        out.append("\nOK" if self.ok else f"\n{len(self.violations)} violation(s)")
        return "\n".join(out)


def plan(run, topology: Topology, stages=("sft", "grpo"), options: PlanOptions = PlanOptions()) -> PlanReport:
    """Check ``run`` (a ``RunConfig``) against ``topology`` for the given training stages."""
    violations: list[str] = []
    warnings: list[str] = []
    try:
        shape = resolve_mesh_shape(run.mesh, topology.num_devices)
    except ValueError as err:
        return PlanReport(topology, {}, (), (f"{err} (topology {topology.name})",))
    mesh_shape = dict(zip(MESH_AXES, shape))
    if run.mesh.num_slices != topology.num_slices:
        violations.append(
            f"mesh.num_slices={run.mesh.num_slices} but topology {topology.name} has "
            f"{topology.num_slices} slice(s); set mesh.num_slices={topology.num_slices}"
        )
    elif topology.num_slices > 1 and mesh_shape["data"] % topology.num_slices:
        violations.append(
            f"data={mesh_shape['data']} must be a multiple of num_slices={topology.num_slices} "
            "(slices talk over DCN, so only the data axis may span them)"
        )
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    procs = topology.num_processes
    budget = options.budget(topology.chip)
    results = []
    seen_dims: set[str] = set()
    for stage in stages:
        cfg, _ = stage_model(run, stage)
        for p in model_params(cfg):
            for msg in divisibility_violations(p.axes, p.shape, mesh_shape):
                if msg not in seen_dims:  # one line per dimension, naming the first param hit
                    seen_dims.add(msg)
                    violations.append(f"{msg} (e.g. {p.path})")
        if stage == "sft":
            sft = run.sft
            rows_global = sft.per_device_batch * shards
            if rows_global % procs:
                violations.append(
                    f"sft: global micro-batch {rows_global} rows (per_device_batch={sft.per_device_batch} "
                    f"x data*fsdp={shards}) does not split over {procs} processes"
                )
            if sft.max_seq_len > cfg.max_position_embeddings:
                violations.append(
                    f"sft.max_seq_len={sft.max_seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
                )
            seq = sft.max_seq_len
        else:
            violations += _grpo_batch_violations(run.grpo, shards, procs)
            g = run.grpo
            if replicated := g.replicated_prompts_warning(shards):
                warnings.append(replicated)
            seq = g.max_prompt_len + g.max_response_len
            if seq > cfg.max_position_embeddings:
                violations.append(
                    f"grpo: max_prompt_len+max_response_len={seq} exceeds "
                    f"max_position_embeddings={cfg.max_position_embeddings}"
                )
        if topology.chip.platform == "tpu" and seq % 128:
            warnings.append(f"{stage}: sequence length {seq} is not a multiple of 128; splash attention pads it")
        sp = StagePlan(stage, tuple(stage_functions(run, stage, mesh_shape, topology.chip.platform, budget)), budget)
        if sp.peak > budget:
            violations.append(
                f"{stage}: estimated peak {sp.peak / GIB:.1f} GiB per chip ({sp.peak_function}) exceeds the "
                f"{budget / GIB:.2f} GiB budget; raise fsdp/tensor, use remat=full, or shrink the "
                "per-chip batch (grpo.micro_batch_rows, sft.per_device_batch)"
            )
        results.append(sp)
    return PlanReport(topology, mesh_shape, tuple(results), tuple(violations), tuple(warnings))


def _grpo_batch_violations(g, shards: int, procs: int) -> list[str]:
    out = []
    rollouts = g.global_batch_prompts * g.rollouts_per_prompt
    mini = g.mini_batch_prompts * g.rollouts_per_prompt
    for what, n in (("global_batch_prompts x G", rollouts), ("mini_batch_prompts x G", mini)):
        if n % shards:
            out.append(f"grpo: {what}={n} is not divisible by data*fsdp={shards}")
    if g.global_batch_prompts % procs:
        out.append(
            f"grpo: global_batch_prompts={g.global_batch_prompts} does not split over "
            f"{procs} processes (each process samples its share of prompts)"
        )
    micro = g.micro_batch_rows
    if micro is not None:
        # The trainer's unit: rows of the whole mini-batch per forward/backward pass.
        if mini % micro:
            out.append(f"grpo.micro_batch_rows={micro} does not divide the mini-batch's {mini} rollouts")
        if micro % shards:
            out.append(
                f"grpo.micro_batch_rows={micro} is not a multiple of data*fsdp={shards}: each pass must give "
                "every batch shard the same number of rows"
            )
    return out
