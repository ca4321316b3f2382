"""Pre-flight planner: will this run config shard cleanly and fit in HBM on this topology?

``plan(run_config, topology)`` checks, before any chip is paid for, that (1) every sharded
dimension of the real parameter shapes divides its mesh axes (the abstract model is built with
``nnx.eval_shape`` and each Variable's ``logical_axes`` is mapped through the one rules table,
so the check follows the model code), (2) batches divide the batch-sharded axes and the hosts,
and (3) the per-chip memory estimate fits in ``usable_fraction`` of HBM.

Per-chip memory, in bytes (``p`` param bytes, ``a`` compute-dtype bytes, ``B`` rows per batch
shard, ``T`` tokens per row, ``D`` hidden, and N, K, F, V the heads, kv heads, mlp width and
vocab *local to a chip* after tensor sharding, ``H`` head_dim, ``L`` layers):

- params: each Variable's local shard, ``prod(shape) / prod(mesh axes its rule uses) * p``.
- grads: the same for trainable Variables (all, or only LoRA ones); a second fp32 copy when
  gradients are accumulated over micro-batches.
- optimizer: AdamW ``mu`` and ``nu`` in fp32 for trainable Variables: ``2 * 4 * local size``.
- gathered weights: FSDP all-gathers a layer's weights before use; two layers in the compute
  dtype are live (the one in use and the prefetched next one).
- activations, per layer with no remat (``act_layer``):
  ``B*T*(a*(6D + 3NH + 2KH + 4F) + 4*(2(N+K)H + 2D))``: residual/norm inputs and outputs, q/k/v
  and the attention output, gate/up/silu/product of the MLP, plus the fp32 RoPE and RMSNorm
  intermediates; plus the attention kernel's residuals: ``4*B*N*T`` (softmax statistics) for
  fused kernels (splash, cuDNN), ``4*B*N*T*T`` (per-block probabilities kept by the scan) for
  the pure-JAX blockwise/reference kernels.
  - remat ``none``: ``L * act_layer``.
  - remat ``full``: ``L * a*B*T*D`` (each layer's input) ``+ act_layer`` (the layer being
    recomputed) ``+ 2*a*B*T*max(D, F)`` (its activation gradients).
  - remat ``dots_saveable``: ``L * a*B*T*(2D + NH + 2KH + 2F)`` (the layer input and the
    outputs of weight matmuls, which have no batch dims) ``+ act_layer + 2*a*B*T*max(D, F)``.
- logits: the LM head is applied blockwise to ``C`` tokens per row at a time:
  ``3 * 4 * B*C*V`` (fp32 logits, their softmax and their gradient).
- rollout KV cache (GRPO): ``2 * L * R * (P + S) * K * H * a`` for R rollouts per batch shard,
  prompt P and response S; ``+ 1/G`` of that for the prefill cache before it is repeated G times.

Training and rollout are phases; the peak is the persistent state plus the larger phase.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types

from grouprank_jax.config import ModelConfig
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_spec, resolve_mesh_shape

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float
    platform: str  # "tpu" | "gpu" | "cpu": picks the attention kernel the model will use


# HBM per chip as JAX reports it. v4 / v5p names count TensorCores (2 per chip, one JAX device per
# chip); v5e / v6e names count chips. GPU figures are nvidia-smi's totals (143,771 / 81,559 MiB).
CHIPS = {
    "v4": Chip("v4", 32.0, "tpu"),
    "v5e": Chip("v5e", 16.0, "tpu"),
    "v5p": Chip("v5p", 95.0, "tpu"),
    "v6e": Chip("v6e", 32.0, "tpu"),
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


# ---- parameters, from the model code itself ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamInfo:
    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    itemsize: int
    lora: bool


@functools.lru_cache(maxsize=16)
def model_params(cfg: ModelConfig) -> tuple[ParamInfo, ...]:
    """Every Variable's shape and logical axes, from an abstract (never allocated) model."""
    import jax.numpy as jnp
    from flax import nnx

    from grouprank_jax.models.qwen2 import Qwen2ForCausalLM

    # Decoder layers are identical modules, so one is built and its Variables repeated per layer:
    # tracing 64 abstract layers costs ~8 s, one costs ~0.2 s, and the shapes are the same.
    one = cfg.replace(num_layers=1)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(one, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes") or (None,) * len(value.shape)
        names = [path] if path[0] != "layers" else [("layers", i, *path[2:]) for i in range(cfg.num_layers)]
        out += [ParamInfo("/".join(map(str, p)), tuple(value.shape), tuple(axes),
                          jnp.dtype(value.dtype).itemsize, isinstance(var, nnx.LoRAParam)) for p in names]
    return tuple(out)


def _spec_mesh(mesh_shape: dict[str, int]):
    # logical_to_spec only reads ``mesh.shape``; a stand-in lets us plan meshes of any size
    # without the devices, using exactly the dropping rule the real sharding uses.
    return types.SimpleNamespace(shape=dict(mesh_shape))


def shard_factor(axes, shape, mesh_shape: dict[str, int], rules=LOGICAL_AXIS_RULES) -> int:
    spec = logical_to_spec(axes, shape, _spec_mesh(mesh_shape), rules)
    factor = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
            factor *= mesh_shape[axis]
    return factor


def divisibility_violations(names, shape, mesh_shape: dict[str, int], rules=LOGICAL_AXIS_RULES) -> list[str]:
    """``"kv_heads=4 is not divisible by tensor=8"`` for each dim its rule's axes do not divide."""
    table = dict(rules)
    out = []
    for name, dim in zip(names, shape):
        axes = [a for a in (table.get(name) or ()) if mesh_shape.get(a, 1) > 1] if name else []
        size = math.prod(mesh_shape[a] for a in axes)
        if size > 1 and dim % size:
            by = f"{axes[0]}={size}" if len(axes) == 1 else (
                "*".join(axes) + f"={size} (" + ", ".join(f"{a}={mesh_shape[a]}" for a in axes) + ")")
            out.append(f"{name}={dim} is not divisible by {by}")
    return out


# ---- memory arithmetic -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryLine:
    name: str
    bytes: float
    note: str = ""


def _local(dim: int, axis_rule: str, mesh_shape: dict[str, int]) -> int:
    return dim // shard_factor((axis_rule,), (dim,), mesh_shape)


def state_memory(cfg: ModelConfig, mesh_shape, lora: bool, grad_accum: bool) -> list[MemoryLine]:
    params = model_params(cfg)
    local = {p.path: math.prod(p.shape) / shard_factor(p.axes, p.shape, mesh_shape) for p in params}
    train = [p for p in params if p.lora] if lora else list(params)
    n_train = sum(local[p.path] for p in train)
    lines = [
        MemoryLine("params", sum(local[p.path] * p.itemsize for p in params), f"{cfg.param_dtype}, sharded by the rules"),
        MemoryLine("grads", sum(local[p.path] * p.itemsize for p in train), "LoRA params only" if lora else "all params"),
        MemoryLine("optimizer (AdamW)", 8 * n_train, "mu + nu in fp32"),
    ]
    if grad_accum:
        lines.append(MemoryLine("grad accumulator", 4 * n_train, "fp32, micro-batches > 1"))
    if mesh_shape.get("fsdp", 1) > 1:
        import jax.numpy as jnp

        layer = [p for p in params if p.path.startswith("layers/0/") and not p.lora]
        gathered = sum(math.prod(p.shape) / shard_factor(p.axes, p.shape, {**mesh_shape, "fsdp": 1}) for p in layer)
        lines.append(MemoryLine("gathered weights", 2 * gathered * jnp.dtype(cfg.dtype).itemsize, "2 layers, FSDP all-gather"))
    return lines


def activation_memory(cfg: ModelConfig, mesh_shape, rows: int, seq: int, loss_tokens: int, platform: str) -> list[MemoryLine]:
    """Training-step activations for ``rows`` rows of ``seq`` tokens per batch shard (see module doc)."""
    import jax.numpy as jnp

    a = jnp.dtype(cfg.dtype).itemsize
    d, h, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    n = _local(cfg.num_heads, "heads", mesh_shape)
    k = _local(cfg.num_kv_heads, "kv_heads", mesh_shape)
    f = _local(cfg.intermediate_size, "mlp", mesh_shape)
    v = _local(cfg.vocab_size, "vocab", mesh_shape)
    bt = rows * seq
    impl = cfg.attention_impl if cfg.attention_impl != "auto" else {"tpu": "splash", "gpu": "cudnn"}.get(platform, "chunked")
    fused = impl in ("splash", "cudnn") and platform in ("tpu", "gpu")
    attn = 4 * rows * n * seq * (1 if fused else seq)
    layer = bt * (a * (6 * d + 3 * n * h + 2 * k * h + 4 * f) + 4 * (2 * (n + k) * h + 2 * d)) + attn
    grad_tmp = 2 * a * bt * max(d, f)
    if cfg.remat == "none":
        saved, note = L * layer, "remat none: every layer's full set"
    elif cfg.remat == "full":
        saved, note = L * a * bt * d + layer + grad_tmp, "remat full: layer inputs + one layer"
    else:
        saved = L * a * bt * (2 * d + n * h + 2 * k * h + 2 * f) + layer + grad_tmp
        note = "remat dots_saveable: inputs + matmul outputs + one layer"
    return [
        MemoryLine("activations", saved, f"{note}; {rows}x{seq} tokens/shard, {'fused' if fused else 'blockwise'} attention"),
        MemoryLine("logits chunk", 3 * 4 * rows * min(loss_tokens, seq) * v, f"{min(loss_tokens, seq)} tokens/row, fp32 x3"),
    ]


def kv_cache_memory(cfg: ModelConfig, mesh_shape, rollouts: int, prompt: int, response: int, group: int) -> MemoryLine:
    import jax.numpy as jnp

    k = _local(cfg.num_kv_heads, "cache_kv_heads", mesh_shape)
    per_row = 2 * cfg.num_layers * (prompt + response) * k * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    total = per_row * rollouts * (1 + 1 / group)
    return MemoryLine("rollout KV cache", total, f"{rollouts} rollouts/shard x {prompt}+{response} tokens (+1/G prefill)")


# ---- the plan -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PlanOptions:
    usable_fraction: float = 0.9  # of HBM: XLA's own buffers and fragmentation take the rest
    grpo_micro_rows: int = 1  # rollouts per batch shard per forward/backward (verl's micro-batch)
    grpo_loss_chunk: int = 1024  # tokens per LM-head block in the GRPO loss


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: str
    persistent: tuple[MemoryLine, ...]
    phases: tuple[tuple[str, tuple[MemoryLine, ...]], ...]
    budget: float

    @property
    def peak(self) -> float:
        return sum(x.bytes for x in self.persistent) + max(sum(x.bytes for x in ls) for _, ls in self.phases)


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
        out = [f"topology {t.name}: {t.num_devices} x {t.chip.name} ({t.chip.hbm_gib:g} GiB), "
               f"{t.num_processes} processes, {t.num_slices} slice(s); mesh {mesh}"]
        for s in self.stages:
            out.append(f"\n[{s.stage}] per-chip memory (GiB)")
            rows = [("", x) for x in s.persistent] + [(p, x) for p, ls in s.phases for x in ls]
            for phase, x in rows:
                label = f"{phase}: {x.name}" if phase else x.name
                out.append(f"  {label:<30} {x.bytes / GIB:9.2f}  {x.note}")
            verdict = "fits" if s.peak <= s.budget else "DOES NOT FIT"
            out.append(f"  {'peak':<30} {s.peak / GIB:9.2f}  budget {s.budget / GIB:.2f} -> {verdict}")
        out += [f"\nWARNING: {w}" for w in self.warnings] + [f"VIOLATION: {v}" for v in self.violations]
        out.append("\nOK" if self.ok else f"\n{len(self.violations)} violation(s)")
        return "\n".join(out)


def _stage_model(run, stage: str) -> tuple[ModelConfig, bool]:
    cfg = run.model
    if stage == "sft" and run.sft.lora_rank:
        return cfg.replace(lora_rank=run.sft.lora_rank, lora_alpha=run.sft.lora_alpha), True
    if stage == "grpo" and run.grpo.lora_enabled:
        return cfg.replace(lora_rank=run.grpo.lora_rank, lora_alpha=run.grpo.lora_alpha,
                           lora_targets=run.grpo.lora_targets), True
    return cfg.replace(lora_rank=0), False


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
        violations.append(f"mesh.num_slices={run.mesh.num_slices} but topology {topology.name} has "
                          f"{topology.num_slices} slice(s); set mesh.num_slices={topology.num_slices}")
    elif topology.num_slices > 1 and mesh_shape["data"] % topology.num_slices:
        violations.append(f"data={mesh_shape['data']} must be a multiple of num_slices={topology.num_slices} "
                          "(slices talk over DCN, so only the data axis may span them)")
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    procs = topology.num_processes
    budget = options.usable_fraction * topology.chip.hbm_gib * GIB
    results = []
    seen_dims: set[str] = set()
    for stage in stages:
        cfg, lora = _stage_model(run, stage)
        for p in model_params(cfg):
            for msg in divisibility_violations(p.axes, p.shape, mesh_shape):
                if msg not in seen_dims:  # one line per dimension, naming the first param hit
                    seen_dims.add(msg)
                    violations.append(f"{msg} (e.g. {p.path})")
        if stage == "sft":
            sft = run.sft
            rows_global = sft.per_device_batch * shards
            if rows_global % procs:
                violations.append(f"sft: global micro-batch {rows_global} rows (per_device_batch={sft.per_device_batch} "
                                  f"x data*fsdp={shards}) does not split over {procs} processes")
            if sft.max_seq_len > cfg.max_position_embeddings:
                violations.append(f"sft.max_seq_len={sft.max_seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
            persistent = state_memory(cfg, mesh_shape, lora, sft.grad_accum_steps > 1)
            train = activation_memory(cfg, mesh_shape, sft.per_device_batch, sft.max_seq_len, sft.loss_chunk_size,
                                      topology.chip.platform)
            phases = (("train", tuple(train)),)
            seq = sft.max_seq_len
        else:
            g = run.grpo
            rollouts = g.global_batch_prompts * g.rollouts_per_prompt
            mini = g.mini_batch_prompts * g.rollouts_per_prompt
            for what, n in (("global_batch_prompts x G", rollouts), ("mini_batch_prompts x G", mini)):
                if n % shards:
                    violations.append(f"grpo: {what}={n} is not divisible by data*fsdp={shards}")
            if g.global_batch_prompts % procs:
                violations.append(f"grpo: global_batch_prompts={g.global_batch_prompts} does not split over "
                                  f"{procs} processes (each process samples its share of prompts)")
            if (mini // shards) % options.grpo_micro_rows:
                violations.append(f"grpo: {mini // shards} rollouts per shard per update are not divisible by "
                                  f"micro-batch rows {options.grpo_micro_rows}")
            seq = g.max_prompt_len + g.max_response_len
            if seq > cfg.max_position_embeddings:
                violations.append(f"grpo: max_prompt_len+max_response_len={seq} exceeds "
                                  f"max_position_embeddings={cfg.max_position_embeddings}")
            persistent = state_memory(cfg, mesh_shape, lora, mini // shards > options.grpo_micro_rows)
            train = activation_memory(cfg, mesh_shape, options.grpo_micro_rows, seq, options.grpo_loss_chunk,
                                      topology.chip.platform)
            cache = kv_cache_memory(cfg, mesh_shape, -(-rollouts // shards), g.max_prompt_len, g.max_response_len,
                                    g.rollouts_per_prompt)
            phases = (("train", tuple(train)), ("rollout", (cache,)))
        if topology.chip.platform == "tpu" and seq % 128:
            warnings.append(f"{stage}: sequence length {seq} is not a multiple of 128; splash attention pads it")
        sp = StagePlan(stage, tuple(persistent), phases, budget)
        if sp.peak > budget:
            violations.append(f"{stage}: estimated peak {sp.peak / GIB:.1f} GiB per chip exceeds {options.usable_fraction:g} x "
                              f"{topology.chip.hbm_gib:g} GiB; raise fsdp/tensor, use remat=full, or shrink the per-chip batch")
        results.append(sp)
    return PlanReport(topology, mesh_shape, tuple(results), tuple(violations), tuple(warnings))
