"""Per-chip memory of every program a run compiles, estimated from the config alone.

One estimate per jitted function the trainers and the sampler run (the same functions
``grouprank compile`` hands to XLA): ``sft_step``, ``grpo_update``, ``grpo_ref_logprobs``,
``sampler_prefill``, ``sampler_decode``. Each is a list of ``MemoryLine``s (what XLA would
account as arguments, outputs and temporaries of that program) plus ``resident``: state that
stays on the chip while the function runs without being one of its arguments (the optimizer
state while the sampler runs). Symbols: ``a`` compute-dtype bytes, ``p`` param bytes, ``t``
tokens per chip in one forward/backward pass, and D, F, N, K, H, V, L the hidden size, MLP
width, heads, kv heads, head dim, vocabulary and layers, *local to a chip* after tensor sharding.

Training-step temporaries (``_train_temporaries``), calibrated against TPU XLA's
``memory_analysis()`` of the compiled steps (v5p, Qwen2.5 shapes; table in docs/scale_out.md):

- gathered weights: XLA all-gathers each layer's FSDP-sharded weights for its matmuls. Under
  gradient accumulation (a scan over micro-batches) the gathers are loop-invariant and XLA hoists
  them out of the loop when HBM allows, so every layer's gathered copy stays live for the whole
  step (the memory report of a compiled step shows them all): ``a * sum(layer params / tensor)``.
  When that would not fit (Qwen2.5-32B over fsdp=128: 58 GiB of gathered layers) it gathers
  again per micro-batch; so does the estimate: two layers in flight, as without accumulation.
- gradients: fp32, once more when micro-batches are accumulated, and AdamW's update tree:
  ``4 * trainable * (2 or 3)``.
- activations per token and layer: remat ``none`` ``a * (2F + 3D + 2NH + 2KH)``;
  ``dots_saveable`` ``a * (2F + 2D + NH + 2KH)`` (matmul outputs); ``full`` ``a * D`` (the layer
  input); plus, for ``full`` / ``dots_saveable``, one layer's recompute working set
  ``a * (6F + 2D + 2NH)`` (``a * 3F`` of backward temporaries for ``none``).
- attention: fused kernels (splash, cuDNN) keep ``4 * N`` bytes of softmax statistics per token
  and layer; the pure-JAX blockwise kernels keep their per-block probabilities (``4 * N * T``).
- the LM head: an fp32 logits block of ``loss_chunk_size`` tokens and its gradient, and the head
  matrix in fp32 and in the compute dtype.
- the embedding lookup: XLA gathers the whole table over fsdp in the param dtype (every
  program; only the vocabulary split over ``tensor`` remains).

Forward-only programs (reference log-probs, prefill) hold two layers' gathered weights, one
layer's working set and one logits block. A KV cache is ``2 * L * rows * slots * K * H * a``. The
shared-prefix sampler (``grpo.shared_prefix_sampling``) holds the prompt KV once per prompt
(``rows = prompts, slots = P``) and a suffix per rollout (``rows = prompts * G, slots = C``); the
per-row layout holds ``prompts * G`` rows of ``P + C`` slots. Either way the decode loop keeps a
second copy of the cache it writes (XLA double-buffers the while-loop carry), and XLA hoists the
loop-invariant FSDP gathers of every layer's weights out of the loop when they fit.
"""

from __future__ import annotations

import dataclasses

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.attention import resolve_impl
from grouprank_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from grouprank_jax.preflight.shapes import ModelShape, local_dim
from grouprank_jax.sampling.batch import batch_bucket


@dataclasses.dataclass(frozen=True)
class MemoryLine:
    name: str
    bytes: float
    note: str = ""


@dataclasses.dataclass(frozen=True)
class FunctionEstimate:
    """One compiled program: its own bytes (``lines``) and what else stays on the chip."""

    name: str
    lines: tuple[MemoryLine, ...]
    resident: float = 0.0
    resident_note: str = ""

    @property
    def bytes(self) -> float:
        return sum(x.bytes for x in self.lines)

    @property
    def total(self) -> float:
        return self.bytes + self.resident


def _fused(cfg: ModelConfig, platform: str) -> bool:
    """Whether training attention runs a fused kernel (splash, cuDNN) on ``platform``: the
    model's own kernel choice (``models/attention.resolve_impl``)."""
    return resolve_impl(cfg.attention_impl, False, platform, cfg.splash_interpret) in ("splash", "cudnn")


def latency_hiding_overlap(cfg: ModelConfig, platform: str, xla_options: dict | None) -> float:
    """Extra recompute working sets TPU XLA's latency-hiding scheduler keeps live.

    To overlap FSDP all-gathers with compute it runs ahead: measured on v5p with Qwen2.5-7B over
    28 layers it held ~4 more working sets than the sequential schedule (SFT at 2 x 32k tokens per
    chip: 106 GiB of temporaries with it, 34 GiB with ``xla_tpu_enable_latency_hiding_scheduler:
    false``; the GRPO update at 1 x 32k: 22 GiB vs a 13 GiB sequential estimate). Fewer layers
    leave less to run ahead of, so the term scales with ``L / 16`` up to 4; deeper models keep
    more: ~``L / 6.4`` (the 32B GRPO update, 64 layers, held ~10 on v5p-256 with HBM to spare,
    the 7B one ~4.4). ``_cap_overlap`` limits the term to the HBM the budget leaves."""
    if platform != "tpu":
        return 0.0
    flag = (xla_options or {}).get("xla_tpu_enable_latency_hiding_scheduler", True)
    if str(flag).lower() in ("false", "0"):
        return 0.0
    return max(4.0 * min(1.0, cfg.num_layers / 16), cfg.num_layers / 6.4)


def _train_temporaries(
    s: ModelShape,
    rows: int,
    seq: int,
    accumulate: bool,
    loss_tokens: int,
    chunk: int,
    platform: str,
    xla_options: dict | None = None,
    hoist_gathers: bool | None = None,
) -> list[MemoryLine]:
    """Temporaries of one jitted training step: ``rows`` x ``seq`` tokens per chip per pass.
    ``hoist_gathers`` (default: ``accumulate``) keeps every layer's gathered weights live."""
    x, a, cfg = s.dims, s.a, s.cfg
    t = rows * seq
    fused = _fused(cfg, platform)
    attn = 4 * x.n * (1 if fused else seq)  # per token and layer
    keep = {
        "none": a * (2 * x.f + 3 * x.d + 2 * x.n * x.h + 2 * x.k * x.h) + attn,
        "dots_saveable": a * (2 * x.f + 2 * x.d + x.n * x.h + 2 * x.k * x.h) + attn,
        "full": a * x.d,
    }[cfg.remat]
    work = a * 3 * x.f if cfg.remat == "none" else a * (6 * x.f + 2 * x.d + 2 * x.n * x.h) + attn
    grads = s.trainable_bytes * (3 if accumulate else 2)
    logits_tokens = min(loss_tokens, chunk, t)
    overlap = latency_hiding_overlap(cfg, platform, xla_options) if cfg.remat != "none" else 0.0
    hoist = accumulate if hoist_gathers is None else hoist_gathers
    lines = [
        MemoryLine("embedding gather", s.embedding_gather_bytes, "table gathered over fsdp for the lookup"),
        MemoryLine(
            "gathered weights",
            s.gathered_layer_bytes(x.L if hoist else 2),
            f"{'every layer' if hoist else 'two layers'} in {cfg.dtype}, gathered over fsdp",
        ),
        MemoryLine("gradients", grads, "fp32" + (" + accumulator" if accumulate else "") + " + AdamW update"),
        MemoryLine(
            "activations",
            t * (x.L * keep + work),
            f"remat {cfg.remat}; {rows}x{seq} tokens/chip; {'fused' if fused else 'blockwise'} attention",
        ),
        MemoryLine(
            "LM head",
            2 * 4 * logits_tokens * x.v + (4 + a) * s.head_count,
            f"{logits_tokens}-token fp32 logits block and its gradient; head in fp32 + {cfg.dtype}",
        ),
    ]
    if overlap:
        lines.append(
            MemoryLine(
                "latency-hiding overlap",
                overlap * t * work,
                f"{overlap:g} more recompute working sets (TPU XLA's latency-hiding scheduler)",
            )
        )
    return lines


def _forward_temporaries(s: ModelShape, tokens: int, platform: str, with_head: bool, chunk: int) -> list[MemoryLine]:
    x, a = s.dims, s.a
    attn = 4 * x.n * (1 if _fused(s.cfg, platform) else tokens)
    lines = [
        MemoryLine("embedding gather", s.embedding_gather_bytes, "table gathered over fsdp for the lookup"),
        MemoryLine("gathered weights", s.gathered_layer_bytes(2), "two layers in flight"),
        MemoryLine(
            "activations",
            tokens * (a * (4 * x.f + 4 * x.d + 2 * x.n * x.h + 2 * x.k * x.h) + attn),
            f"one layer's working set, {tokens} tokens/chip",
        ),
    ]
    if with_head:
        lines.append(MemoryLine("LM head", 4 * min(chunk, tokens) * x.v, "one fp32 logits block"))
    return lines


def kv_cache_bytes(s: ModelShape, rows: int, slots: int) -> float:
    x = s.dims
    k = local_dim(s.cfg.num_kv_heads, "cache_kv_heads", s.mesh_shape)
    return 2 * x.L * rows * slots * k * x.h * s.a


def stage_model(run, stage: str) -> tuple[ModelConfig, bool]:
    """The model config a stage trains (LoRA adapters added per its section) and whether LoRA."""
    section = run.sft if stage == "sft" else run.grpo
    lora = bool(run.sft.lora_rank) if stage == "sft" else run.grpo.lora_enabled
    if not lora:
        return run.model.replace(lora_rank=0), False
    adapters = dict(lora_rank=section.lora_rank, lora_alpha=section.lora_alpha, lora_targets=section.lora_targets)
    return run.model.replace(**adapters), True


def _div(a: int, b: int) -> int:
    return max(1, -(-a // b))


def _hoisting(fixed: list[MemoryLine], temporaries, budget: float | None) -> list[MemoryLine]:
    """A training step's temporaries with hoisted gathers when they fit ``budget`` with the rest,
    else with per-micro-batch gathers (what XLA does)."""
    hoisted = temporaries(None)
    if budget is None or sum(x.bytes for x in fixed + hoisted) <= budget:
        return hoisted
    return _cap_overlap(fixed, temporaries(False), budget)


def _cap_overlap(fixed: list[MemoryLine], lines: list[MemoryLine], budget: float) -> list[MemoryLine]:
    """The latency-hiding scheduler runs ahead with the HBM it has to spare: on a chip with room
    it kept ~L/6.4 working sets (32B GRPO update on v5p-256), on a fuller one fewer (32B SFT).
    So the overlap term is cut to what the budget leaves; when that cut binds, the estimate is
    at the budget and says so (if compiling then fails, turn the scheduler off in xla_options)."""
    excess = sum(x.bytes for x in fixed + lines) - budget
    out = []
    for line in lines:
        if line.name == "latency-hiding overlap" and excess > 0:
            kept = max(0.0, line.bytes - excess - 1.0)
            note = "cut to the budget: XLA's scheduler overlaps with spare HBM; if compile fails, set "
            line = MemoryLine(line.name, kept, note + "xla_options.xla_tpu_enable_latency_hiding_scheduler=false")
        out.append(line)
    return out


def stage_functions(
    run, stage: str, mesh_shape: dict, platform: str, budget: float | None = None
) -> list[FunctionEstimate]:
    """The estimates of every program ``stage`` compiles (``budget``: the per-chip bytes a program
    may use, which decides whether XLA can keep hoisted weight gathers)."""
    cfg, lora = stage_model(run, stage)
    s = ModelShape(cfg, dict(mesh_shape), lora)
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    params = MemoryLine("params", s.param_bytes, f"{cfg.param_dtype}, sharded by the rules")
    opt = MemoryLine(
        "optimizer (AdamW)", s.opt_bytes, f"mu + nu in {cfg.param_dtype}" + (", LoRA adapters only" if lora else "")
    )
    if stage == "sft":
        sft = run.sft
        batch = MemoryLine("batch", 6 * 4 * sft.grad_accum_steps * sft.per_device_batch * sft.max_seq_len, "int32")
        fixed = [params, opt, batch]
        lines = fixed + _hoisting(
            fixed,
            lambda hoist: _train_temporaries(
                s,
                sft.per_device_batch,
                sft.max_seq_len,
                sft.grad_accum_steps > 1,
                sft.max_seq_len,
                cfg.loss_chunk_size,
                platform,
                run.xla_options,
                hoist,
            ),
            budget,
        )
        return [FunctionEstimate("sft_step", tuple(lines))]

    g = run.grpo
    G, P, C = g.rollouts_per_prompt, g.max_prompt_len, g.max_response_len
    chunk = cfg.loss_chunk_size
    mini_rows = g.mini_batch_prompts * G
    micro = g.micro_batch_rows or mini_rows
    micro_local = _div(micro, shards)
    ref_copy = s.trainable_bytes if (g.kl_coef and not lora) else 0.0  # frozen copy, param dtype
    rows_local = _div(mini_rows, shards)
    batch = MemoryLine("rollout rows", rows_local * ((P + C) * 8 + C * 16 + 4), "ids, masks, log-probs, advantages")
    fixed = [params, opt, batch]
    if g.shared_prefix:
        # One prompt forward per prompt of the pass (its per-layer KV kept, with gradient, for
        # the G responses) + G responses of C tokens: P + G*C tokens per prompt, not G*(P + C).
        # A pass's prompt batch is sharded over the batch axes only when they divide it
        # (``logical_to_spec``); otherwise every chip runs every prompt of the pass.
        prompts_pass = (micro // G) // shards if (micro // G) % shards == 0 else micro // G
        pass_tokens = prompts_pass * P + micro_local * C
        prompt_kv = MemoryLine(
            "prompt KV (shared)", kv_cache_bytes(s, prompts_pass, P), f"{prompts_pass} prompts x {P}, all layers"
        )
        fixed = [params, opt, batch, prompt_kv]
        temporaries = lambda hoist: _train_temporaries(
            s, 1, pass_tokens, micro < mini_rows, micro_local * C, chunk, platform, run.xla_options, hoist
        )
    else:
        temporaries = lambda hoist: _train_temporaries(
            s, micro_local, P + C, micro < mini_rows, C, chunk, platform, run.xla_options, hoist
        )
    update = fixed + _hoisting(fixed, temporaries, budget)
    out = [FunctionEstimate("grpo_update", tuple(update), ref_copy, "frozen KL reference" if ref_copy else "")]
    all_rows = _div(g.global_batch_prompts * G, shards)
    if g.kl_coef:
        ref = [
            params,
            MemoryLine("rollout ids", all_rows * (P + C) * 8 + all_rows * C * 4, "ids, mask in; log-probs out"),
        ]
        ref_tokens = pass_tokens if g.shared_prefix else micro_local * (P + C)
        if g.shared_prefix:
            ref.append(prompt_kv)
        ref += _forward_temporaries(s, ref_tokens, platform, True, chunk)
        out.append(FunctionEstimate("grpo_ref_logprobs", tuple(ref), s.opt_bytes + ref_copy, "optimizer state"))
    # The sampler pads a call's prompts to a power of two that the batch shards divide
    # (Sampler.bucket_shape): 12 prompts compile (and hold KV) as 16.
    prompts_local = _div(batch_bucket(g.global_batch_prompts, shards), shards)
    resident, note = s.opt_bytes + ref_copy, "optimizer state" + (" + KL reference" if ref_copy else "")
    rows = prompts_local * G
    step = MemoryLine(
        "step temporaries",
        rows * (6 * 4 * s.dims.v + 8 * C) + s.embedding_gather_bytes,
        "fp32 logits and the draw's vocabulary-wide buffers, tokens/log-probs, the gathered embedding table",
    )
    if g.shared_prefix_sampling:
        # One prompt KV per prompt (read-only in the loop) + each row's suffix, which the while
        # loop keeps twice (its carry and the body's update), like the per-row cache below.
        prompt_kv = kv_cache_bytes(s, prompts_local, P)
        prefill = [
            params,
            MemoryLine("prompt KV (output)", prompt_kv, f"{prompts_local} prompts x {P} slots, once"),
            MemoryLine("prompt KV (written)", prompt_kv, "the cache the layers write before it is returned"),
        ]
        suffix = kv_cache_bytes(s, rows, C)
        decode = [
            params,
            MemoryLine("prompt KV (shared)", prompt_kv, f"{prompts_local} prompts x {P} slots for G={G} rollouts"),
            MemoryLine("suffix KV", suffix, f"{rows} rows x {C} slots"),
            MemoryLine("suffix KV (loop copy)", suffix, "the while loop's second buffer"),
            step,
        ]
    else:
        cache_rows = kv_cache_bytes(s, rows, P + C)
        prefill = [
            params,
            MemoryLine("KV cache (output)", cache_rows, f"{prompts_local} prompts x G={G} rows x {P}+{C} slots"),
            MemoryLine("prefill cache", kv_cache_bytes(s, prompts_local, P + C), "before the repeat for G rollouts"),
        ]
        decode = [
            params,
            MemoryLine("KV cache (donated)", cache_rows, f"{rows} rows x {P}+{C} slots"),
            MemoryLine("KV cache (loop copy)", cache_rows, "the while loop's second buffer"),
            step,
        ]
    # The layers' FSDP all-gathers are loop-invariant in the decode loop: TPU XLA hoists them out
    # of it, keeping every layer's gathered weights live, when that fits (seen compiling the 32B
    # decode for v5p-256: 64 layers x 120 MiB); otherwise two layers are in flight per step.
    hoisted = MemoryLine("gathered weights", s.gathered_layer_bytes(s.dims.L), "every layer, hoisted out of the loop")
    if budget is not None and sum(x.bytes for x in decode) + hoisted.bytes + resident > budget:
        hoisted = MemoryLine("gathered weights", s.gathered_layer_bytes(2), "two layers in flight")
    decode.append(hoisted)
    prefill += _forward_temporaries(s, prompts_local * P, platform, False, chunk)
    out.append(FunctionEstimate("sampler_prefill", tuple(prefill), resident, note))
    out.append(FunctionEstimate("sampler_decode", tuple(decode), resident, note))
    return out


def function_estimates(run, topology, phases) -> dict[str, float]:
    """Function name -> estimated per-chip bytes of that program alone (what XLA's
    ``memory_analysis`` accounts), for ``grouprank compile``'s comparison column."""

    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(run.mesh, topology.num_devices)))
    budget = (topology.chip.xla_hbm_gib or topology.chip.hbm_gib) * 1024**3
    out = {}
    for phase in phases:
        for fn in stage_functions(run, phase, mesh_shape, topology.chip.platform, budget):
            out[fn.name] = fn.bytes
    return out
