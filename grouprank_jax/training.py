"""What the SFT and GRPO loops share: building the model a run starts from, adding LoRA
adapters to loaded weights, and the run directory (checkpoints, metrics, preemption)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.build import create_model, set_mesh, variable_sharding
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"


def load_initial_model(init_from: str | None, model_cfg: ModelConfig, mesh: Mesh | None, seed: int = 0):
    """The model a run starts from: a HF directory, a grouprank checkpoint / run dir, or random.

    Numerics and kernels (dtype, attention, remat) always come from ``model_cfg``; shapes
    come from the checkpoint when there is one.
    """
    keep = dict(param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype, attention_impl=model_cfg.attention_impl,
                attention_block_size=model_cfg.attention_block_size, remat=model_cfg.remat,
                splash_block_size=model_cfg.splash_block_size, splash_interpret=model_cfg.splash_interpret)
    if init_from is None:
        return create_model(model_cfg.replace(lora_rank=0), mesh=mesh, seed=seed)
    from grouprank_jax.commands.convert import load_any_checkpoint

    model = load_any_checkpoint(init_from, mesh=mesh)
    if model.cfg.lora_rank:
        model = merge_lora_into_base(model, mesh)
    cfg = model.cfg.replace(**keep)
    if jnp.dtype(cfg.param_dtype) != jnp.dtype(model.cfg.param_dtype):
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x: x.astype(cfg.param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        model = nnx.merge(graphdef, state)
    return rebuild_with_config(model, cfg, mesh, seed)


def merge_lora_into_base(model, mesh: Mesh | None):
    """A model without adapters whose kernels carry ``W + scale * A @ B``."""
    from grouprank_jax.models.lora import merged_kernels

    merged = merged_kernels(model)
    base = rebuild_with_config(model, model.cfg.replace(lora_rank=0), mesh, 0)
    flat = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for path, value in merged.items():
        variable = flat[path]
        sharding = variable.get_value().sharding
        variable.set_value(jax.device_put(value, sharding))
    return base


def rebuild_with_config(model, cfg: ModelConfig, mesh: Mesh | None, seed: int):
    """Same weights under a new config (numerics, LoRA adapters): base params are moved over,
    adapters absent from ``model`` are freshly initialised (B = 0, so outputs are unchanged)."""
    fresh = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed), mesh=mesh))
    graphdef, state = nnx.split(fresh)
    old = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(state):
        abstract = variable.get_value()
        if path in old and not isinstance(variable, nnx.LoRAParam):
            value = old[path].get_value().astype(abstract.dtype)
        elif isinstance(variable, nnx.LoRAParam):
            if str(path[-1]).endswith("_lora_b"):
                value = np.zeros(abstract.shape, abstract.dtype)
            else:
                fan_in = int(np.prod(abstract.shape[:-1]))
                value = (rng.standard_normal(abstract.shape) / np.sqrt(fan_in)).astype(abstract.dtype)
        else:
            raise KeyError(f"parameter {'.'.join(map(str, path))} is missing from the source model")
        if mesh is not None:
            value = jax.device_put(value, variable_sharding(variable, mesh))
        else:
            value = jnp.asarray(value)
        variable.set_value(value)
    new = nnx.merge(graphdef, state)
    set_mesh(new, mesh)
    return new


def load_stage_records(records, files, purpose: str, key: str):
    """The records a stage trains on: ``records`` when given, else the validated ``files``."""
    if records is not None:
        return list(records)
    from grouprank_jax.data.records import iter_records

    if not files:
        raise ValueError(f"no {purpose.upper()} data: set data.{key} to JSONL/Parquet files")
    return list(iter_records(list(files), purpose=purpose))


@dataclasses.dataclass
class RunDir:
    """Layout of a training run directory."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def prepare(self) -> None:
        if jax.process_index() == 0:
            self.root.mkdir(parents=True, exist_ok=True)


def save_base_weights(model, run_dir: RunDir) -> None:
    """Write ``model_config.json`` and, for a LoRA run, the frozen full weights it adapts
    (export merges the adapters into them; full fine-tuning checkpoints carry every weight)."""
    import json

    from grouprank_jax.weights.orbax_io import save_params

    from grouprank_jax.parallel.distributed import agree_max

    run_dir.prepare()
    # Every process must take the same branch (the save is collective): ask process 0 only.
    missing = int(jax.process_index() == 0 and not (run_dir.base / "params").exists())
    if model.cfg.lora_rank and agree_max(missing):
        base = rebuild_with_config(model, model.cfg.replace(lora_rank=0), model.mesh, 0)
        save_params(base, run_dir.base)
    if jax.process_index() == 0:
        (run_dir.root / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
