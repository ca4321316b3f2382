"""Every way of turning a path into a model, in one place.

``load_model(path)`` accepts what users point the CLI at: a Hugging Face Qwen2 directory
(``config.json`` + safetensors), a ``grouprank import-hf`` checkpoint (``model_config.json`` +
``params/``) or a training run directory (``model_config.json`` + ``checkpoints/``, LoRA runs
with their frozen base under ``base/params``). ``initial_model`` is what a training stage starts
from; ``rebuild_with_config`` moves weights under a new config (numerics, LoRA adapters) and
``merge_lora`` folds adapters into their kernels. Commands only parse arguments and call these.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.checkpoint import Checkpointer
from grouprank_jax.config import ModelConfig
from grouprank_jax.models.build import create_model, state_shardings, variable_sharding
from grouprank_jax.models.lora import merged_kernels
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.training.state import split_model
from grouprank_jax.weights.hf_io import load_hf
from grouprank_jax.weights.orbax_io import CONFIG_FILE, abstract_model, load_params, read_model_config, restore_target

log = logging.getLogger(__name__)

# Fields a run's config decides even when the weights come from a checkpoint: numerics and kernels.
RUNTIME_FIELDS = (
    "param_dtype",
    "dtype",
    "attention_impl",
    "attention_block_size",
    "remat",
    "splash_block_size",
    "splash_interpret",
    "loss_chunk_size",
)

# The architecture: what ``init_from`` decides; a config naming another one is warned about.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
)


class NotACheckpointError(FileNotFoundError):
    """A path that is none of the model layouts ``load_model`` reads."""


def load_model(path: str | Path, *, step: int | None = None, mesh: Mesh | None = None) -> Qwen2ForCausalLM:
    """A model from a HF directory, an ``import-hf`` checkpoint or a training run directory
    (``step``: that checkpoint of a run; default the latest)."""
    path = Path(path)
    if not path.exists():
        raise NotACheckpointError(f"{path} does not exist")
    single = (path / CONFIG_FILE).exists() and (path / "params").exists()
    if step is not None and (single or (path / "config.json").exists()):
        raise ValueError(f"step={step} picks a checkpoint of a training run directory; {path} holds one set of weights")
    if single:
        return load_params(path, mesh=mesh)
    if (path / "config.json").exists():
        return load_hf(path, mesh=mesh)
    if (path / CONFIG_FILE).exists() and (path / "checkpoints").exists():
        return load_trained_model(path, step=step, mesh=mesh)
    raise NotACheckpointError(
        f"{path} is not a model: expected a Hugging Face directory (config.json + model.safetensors), a "
        f"`grouprank import-hf` checkpoint ({CONFIG_FILE} + params/) or a training run directory "
        f"({CONFIG_FILE} + checkpoints/)"
    )


def load_trained_model(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> Qwen2ForCausalLM:
    """The model of a training run at ``step`` (default: the latest checkpoint), adapters included.

    Full fine-tuning checkpoints carry every parameter; LoRA runs store only the adapters, which
    are put on the frozen full weights under ``base/params``.
    """

    run_dir = Path(run_dir)
    cfg = read_model_config(run_dir)  # raises a clear error if this is no grouprank directory
    lora = bool(cfg.lora_rank)
    if lora:
        if not (run_dir / "base" / "params").exists():
            raise NotACheckpointError(f"{run_dir}: a LoRA run needs its base weights under base/params")
        base = load_params(run_dir, mesh=mesh, params_dir=run_dir / "base" / "params", lora_rank=0)
        model = rebuild_with_config(base, cfg, mesh, 0)
    else:
        model = abstract_model(cfg, mesh)
    graphdef, trainable, frozen = split_model(model, lora)
    # Only the trainable weights, straight onto this process's mesh: the run may have been saved
    # on another device set (a pod slice, exported on one host), and its optimizer state is not
    # needed here.
    target = restore_target(trainable, mesh)
    with Checkpointer(run_dir / "checkpoints", async_save=False, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise NotACheckpointError(f"{run_dir / 'checkpoints'} holds no finished checkpoint")
        restored = ckpt.restore(step, target={"trainable": target}, partial=True)
    trainable.replace_by_pure_dict(restored.state["trainable"])
    return nnx.merge(graphdef, trainable, frozen)


def initial_model(init_from: str | None, model_cfg: ModelConfig, mesh: Mesh | None, seed: int = 0) -> Qwen2ForCausalLM:
    """The model a training stage starts from: ``init_from`` (any ``load_model`` path; adapters
    of a LoRA run merged) or a random init. Shapes come from the checkpoint; numerics and kernels
    (``RUNTIME_FIELDS``) always from ``model_cfg``."""
    if init_from is None:
        return create_model(model_cfg.replace(lora_rank=0), mesh=mesh, seed=seed)
    model = load_model(init_from, mesh=mesh)
    ours, theirs = model.cfg, model_cfg
    differ = [
        f"{k} {getattr(ours, k)} (config: {getattr(theirs, k)})"
        for k in SHAPE_FIELDS
        if getattr(ours, k) != getattr(theirs, k)
    ]
    if differ:
        log.warning(
            "init_from=%s holds another model than the config's model section: %s; training the "
            "checkpoint's model (`grouprank plan` and `compile` size the config's: set model.preset to match)",
            init_from,
            ", ".join(differ),
        )
    if model.cfg.lora_rank:
        model = merge_lora(model, mesh)
    cfg = model.cfg.replace(**{k: getattr(model_cfg, k) for k in RUNTIME_FIELDS})
    return rebuild_with_config(model, cfg, mesh, seed)


def resumed_base(run_dir: str | Path, model_cfg: ModelConfig, mesh: Mesh | None) -> Qwen2ForCausalLM | None:
    """The full weights a run started from (``base/params``, written at its first start: a LoRA
    run's frozen base, a full fine-tuning GRPO run's KL reference), when ``run_dir`` already holds
    checkpoints; None otherwise. A resume starts from these, not from ``init_from``, which may
    have changed since (e.g. a run dir that trained on, a re-converted HF directory): the adapters
    go on the base export merges them into, and the KL term keeps its reference. Numerics and
    kernels (``RUNTIME_FIELDS``) come from ``model_cfg``."""
    from grouprank_jax.parallel.distributed import agree_max

    run_dir = Path(run_dir)
    steps = run_dir / "checkpoints"
    found = (run_dir / "base" / "params").exists() and steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())
    if not agree_max(int(jax.process_index() == 0 and found)):  # one answer on every process
        return None
    base = load_params(run_dir, mesh=mesh, params_dir=run_dir / "base" / "params", lora_rank=0)
    log.info("resuming: the weights the run started from come from %s", run_dir / "base" / "params")
    return rebuild_with_config(base, base.cfg.replace(**{k: getattr(model_cfg, k) for k in RUNTIME_FIELDS}), mesh, 0)


def merge_lora(model: Qwen2ForCausalLM, mesh: Mesh | None) -> Qwen2ForCausalLM:
    """A model without adapters whose kernels carry ``W + scale * A @ B``."""
    merged = merged_kernels(model)
    base = rebuild_with_config(model, model.cfg.replace(lora_rank=0), mesh, 0)
    flat = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for path, value in merged.items():
        variable = flat[path]
        variable.set_value(jax.device_put(value, variable.get_value().sharding))
    return base


def with_lora(model: Qwen2ForCausalLM, rank: int, alpha: float, targets, mesh: Mesh | None, seed: int):
    """The model with fresh LoRA adapters (B = 0: the outputs are unchanged) on ``targets``."""
    return rebuild_with_config(
        model, model.cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets)), mesh, seed
    )


def _fresh_adapters(cfg: ModelConfig, mesh: Mesh | None, seed: int) -> dict:
    """The LoRA parameters a freshly built model with ``seed`` has (the modules' own init; XLA
    drops the base weights' initialisation, which nothing reads)."""

    def adapters():
        return nnx.state(Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed), mesh=mesh), nnx.LoRAParam)

    if mesh is None or mesh.size == 1:
        return dict(nnx.to_flat_state(jax.jit(adapters)()))
    shardings = state_shardings(nnx.eval_shape(adapters), mesh)
    return dict(nnx.to_flat_state(jax.jit(adapters, out_shardings=shardings)()))


def rebuild_with_config(model: Qwen2ForCausalLM, cfg: ModelConfig, mesh: Mesh | None, seed: int) -> Qwen2ForCausalLM:
    """The same weights under a new config (numerics, LoRA adapters, mesh): base parameters move
    over (cast to the new param dtype), adapters the old model lacks start fresh."""
    fresh = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed), mesh=mesh))
    graphdef, state = nnx.split(fresh)
    old = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    adapters = None
    for path, variable in nnx.to_flat_state(state):
        target = variable.get_value()
        if path in old:
            value = old[path].get_value().astype(target.dtype)
        elif isinstance(variable, nnx.LoRAParam):
            adapters = adapters if adapters is not None else _fresh_adapters(cfg, mesh, seed)
            value = adapters[path].get_value()
        else:
            raise KeyError(f"parameter {'.'.join(map(str, path))} is missing from the source model")
        variable.set_value(
            jax.device_put(value, variable_sharding(variable, mesh)) if mesh is not None else jnp.asarray(value)
        )
    return nnx.merge(graphdef, state)
