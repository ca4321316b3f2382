"""``grouprank compile``: lower and compile the programs a run will execute, for its real TPU
slice, from any host (a CPU laptop included), and read the per-chip memory from TPU XLA itself.

The programs are the trainers' and the sampler's own jitted functions, built by the same
builders the loops call (``make_sft_step``, ``make_grpo_update``, ``make_logprob_fn``,
``Sampler.lower``) over an abstract model whose parameters are ``jax.ShapeDtypeStruct``s with
the run's shardings: no data file, no checkpoint and no weight is touched. Shapes are each
function's worst case under the config (the largest prompt and completion buckets).

Per function the report gives XLA's ``memory_analysis()`` per chip: arguments, outputs (minus
what aliases donated arguments), temporaries, generated code, plus ``resident``: state that
lives on the chip during that function without being one of its arguments (the optimizer
state while the sampler runs), so that ``total`` is what the chip must hold.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.models.build import abstract_sharded_model
from grouprank_jax.parallel.mesh import (
    MESH_AXES,
    make_mesh,
    named_sharding,
    per_chip_bytes,
    resolve_mesh_shape,
    tpu_reserved_hbm_options,
)
from grouprank_jax.preflight.memory import function_estimates, stage_model
from grouprank_jax.preflight.report import CompiledFunction, CompileReport
from grouprank_jax.preflight.topology import Topology, topology_devices
from grouprank_jax.rl.losses import loss_kwargs
from grouprank_jax.rl.rollout import STOP_STRING
from grouprank_jax.rl.step import make_grpo_optimizer, make_grpo_update, make_logprob_fn
from grouprank_jax.sampling import Sampler, SamplingParams
from grouprank_jax.sft.step import make_sft_optimizer, make_sft_step
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.training.state import batch_sharding, opt_state_shardings, trainable_filter

log = logging.getLogger(__name__)

FUNCTIONS = ("sft_step", "grpo_update", "grpo_ref_logprobs", "sampler_prefill", "sampler_decode")


@dataclasses.dataclass
class AbstractTrainState:
    graphdef: object
    trainable: nnx.State
    frozen: nnx.State
    opt_state: object


def abstract_train_state(model_cfg, mesh: Mesh, tx, lora: bool) -> AbstractTrainState:
    """What ``init_train_state`` builds, as sharded ShapeDtypeStructs (nothing allocated)."""
    model = abstract_sharded_model(model_cfg, mesh)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(lora), ...)
    shapes = jax.eval_shape(tx.init, trainable)
    opt_state = jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        shapes,
        opt_state_shardings(tx, trainable, mesh),
    )
    return AbstractTrainState(graphdef, trainable, frozen, opt_state)


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One program to compile: how to lower it, and what else stays on the chip meanwhile."""

    name: str
    shapes: str  # in words, for the report
    lower: Callable[[], jax.stages.Lowered]
    resident: int = 0
    xla_options: dict | None = None  # the options the trainer's own jit carries


def compile_job(job: CompileJob, keep_hlo: bool) -> CompiledFunction:
    name, shapes, resident = job.name, job.shapes, job.resident
    t0 = time.perf_counter()
    options = dict(job.xla_options or {})  # the run's own (RunConfig.xla_options)
    try:
        compiled = job.lower().compile(compiler_options=options or None)
    except Exception as err:
        message = f"{type(err).__name__}: {str(err).strip()}"
        return CompiledFunction(name, shapes, time.perf_counter() - t0, resident_bytes=resident, error=message)
    seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    return CompiledFunction(
        name,
        shapes,
        seconds,
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
        code_bytes=stats.generated_code_size_in_bytes,
        resident_bytes=resident,
        hlo=compiled.as_text() if keep_hlo else None,
    )


def _spec(mesh: Mesh, shape, dtype, names) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=named_sharding(mesh, names, tuple(shape)))


# ---- SFT ----------------------------------------------------------------------------------------


def sft_jobs(run, mesh: Mesh) -> list[CompileJob]:
    """The SFT trainer's step, as ``train_sft`` builds it, over abstract sharded state."""
    sft = run.sft
    model_cfg, lora = stage_model(run, "sft")
    tx = make_sft_optimizer(sft, total_steps=1000)  # the schedule's length does not change the program
    state = abstract_train_state(model_cfg, mesh, tx, lora)
    rows = sft.per_device_batch * mesh.shape["data"] * mesh.shape["fsdp"]
    shape = (sft.grad_accum_steps, rows, sft.max_seq_len)
    sharding = batch_sharding(mesh, 3, batch_axis=1)
    batch = {
        key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        for key in ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "attention_mask")
    }
    step = make_sft_step(state.graphdef, tx, run.model.loss_chunk_size, compiler_options=run.xla_options)
    words = f"{sft.grad_accum_steps} x {rows} rows x {sft.max_seq_len} tokens" + (", LoRA" if lora else "")
    lower = lambda: step.lower(state.trainable, state.frozen, state.opt_state, batch)
    return [CompileJob("sft_step", words, lower, 0, run.xla_options)]


# ---- GRPO ---------------------------------------------------------------------------------------


def grpo_jobs(run, mesh: Mesh) -> list[CompileJob]:
    """The GRPO trainer's update and reference log-probs and the sampler's prefill and decode, as
    ``train_grpo`` builds them, at the largest buckets the config allows."""
    grpo = run.grpo
    model_cfg, lora = stage_model(run, "grpo")
    tx = make_grpo_optimizer(grpo, total_updates=1000)
    state = abstract_train_state(model_cfg, mesh, tx, lora)
    G = grpo.rollouts_per_prompt
    P, C = grpo.max_prompt_len, grpo.max_response_len  # the largest buckets the trainer can form
    chunk = run.model.loss_chunk_size
    opt_bytes = per_chip_bytes(state.opt_state)
    ref_copy = bool(grpo.kl_coef) and not lora  # full fine-tuning keeps a frozen copy as the KL reference
    ref_bytes = per_chip_bytes(state.trainable) if ref_copy else 0
    out: list[CompileJob] = []

    def rows_batch(rows: int, with_ref: bool) -> dict:
        batch = {
            "seq_ids": _spec(mesh, (rows, P + C), jnp.int32, ("batch", None)),
            "seq_mask": _spec(mesh, (rows, P + C), jnp.int32, ("batch", None)),
            "completion_mask": _spec(mesh, (rows, C), jnp.int32, ("batch", None)),
            "old_logp": _spec(mesh, (rows, C), jnp.float32, ("batch", None)),
            "advantages": _spec(mesh, (rows,), jnp.float32, ("batch",)),
        }
        if with_ref:
            batch["ref_logp"] = _spec(mesh, (rows, C), jnp.float32, ("batch", None))
        return batch

    mini_rows = grpo.mini_batch_prompts * G
    micro = grpo.micro_batch_rows or mini_rows
    rollouts = G if grpo.shared_prefix else None
    # the shared-prefix update runs each prompt once and G responses over its KV
    per_pass = f"{micro // G} prompts x {P} + {micro} rows x {C} tokens" if rollouts else f"{micro} rows"
    update = make_grpo_update(
        state.graphdef,
        tx,
        loss_kwargs(grpo),
        P,
        chunk,
        micro_rows=grpo.micro_batch_rows,
        compiler_options=run.xla_options,
        rollouts=rollouts,
        temperature=grpo.temperature,
    )
    batch = rows_batch(mini_rows, bool(grpo.kl_coef))
    out.append(
        CompileJob(
            "grpo_update",
            f"{mini_rows} rows x {P}+{C} tokens, {per_pass} per pass",
            lambda: update.lower(state.trainable, state.frozen, state.opt_state, batch),
            ref_bytes,
            run.xla_options,
        )
    )
    if grpo.kl_coef:
        all_rows = grpo.global_batch_prompts * G
        ref_fn = make_logprob_fn(
            state.graphdef,
            P,
            chunk,
            use_lora=False,
            micro_rows=grpo.micro_batch_rows,
            compiler_options=run.xla_options,
            rollouts=rollouts,
            temperature=grpo.temperature,
        )
        ids = rows_batch(all_rows, False)
        # LoRA: the reference is the adapters switched off; full: the frozen copy (same shapes).
        resident = opt_bytes + (per_chip_bytes(state.trainable) if ref_copy else 0)
        out.append(
            CompileJob(
                "grpo_ref_logprobs",
                f"{all_rows} rows x {P}+{C} tokens, {per_pass} per pass",
                lambda: ref_fn.lower(state.trainable, state.frozen, ids["seq_ids"], ids["seq_mask"]),
                resident,
                run.xla_options,
            )
        )
    model = nnx.merge(state.graphdef, state.trainable, state.frozen)
    resident = opt_bytes + ref_bytes
    sampler_options = {**run.xla_options, **tpu_reserved_hbm_options(mesh, resident)}  # as the trainer builds it
    sampler = Sampler(
        model,
        tokenizer=load_tokenizer(),
        mesh=mesh,
        max_prompt_len=P,
        max_new_tokens=C,
        compiler_options=sampler_options,
        shared_prefix=grpo.shared_prefix_sampling,
    )
    params = SamplingParams(
        temperature=grpo.temperature, n=G, max_new_tokens=C, stop=(STOP_STRING,), tempered_logprobs=True
    )
    lowered: dict = {}

    def lower(which: int):
        if not lowered:
            lowered["pair"] = sampler.lower(grpo.global_batch_prompts, P, params)
        return lowered["pair"][which]

    b, t = sampler.bucket_shape(grpo.global_batch_prompts, P)
    # The sampler's options (the resident reservation included) are inside its own jits.
    out.append(CompileJob("sampler_prefill", f"{b} prompts x {t} tokens, n={G}", lambda: lower(0), resident))
    layout = (
        f"{b} prompt KVs x {t} slots shared by G={G}, {b * G} rows x {C} suffix slots"
        if grpo.shared_prefix_sampling
        else f"{b * G} rows x {t}+{C} slots"
    )
    out.append(CompileJob("sampler_decode", layout, lambda: lower(1), resident))
    return out


def compile_run(
    run,
    topology: Topology,
    phases=("sft", "grpo"),
    keep_hlo: bool = False,
    on_function: Callable[[CompiledFunction], None] | None = None,
    only: Collection[str] | None = None,
) -> CompileReport:
    """Compile ``run``'s programs for ``topology`` (TPU slices; see ``topology_devices``);
    ``only`` restricts them to those function names (e.g. one program of a large model, whose
    compile can need tens of GB of host memory)."""
    unknown = sorted(set(only or ()) - set(FUNCTIONS))
    if unknown:
        raise ValueError(f"unknown function(s) {unknown}; choose from {list(FUNCTIONS)}")
    devices = topology_devices(topology)
    mesh = make_mesh(run.mesh, devices)
    functions: list[CompiledFunction] = []
    for phase in phases:
        for job in (sft_jobs if phase == "sft" else grpo_jobs)(run, mesh):
            if only and job.name not in only:
                continue
            functions.append(compile_job(job, keep_hlo))
            if on_function is not None:
                on_function(functions[-1])
    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(run.mesh, topology.num_devices)))
    estimates = function_estimates(run, topology, phases)
    return CompileReport(topology, mesh_shape, tuple(functions), estimates)
