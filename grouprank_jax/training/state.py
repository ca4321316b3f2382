"""The explicit train-state pytree shared by the SFT and GRPO loops: its optimizer, the
optimizer state's shardings, batches placed on the mesh, and its checkpoint round trip.

The model is split once (``graphdef``, ``trainable``, ``frozen``): jitted steps are pure
functions of ``(trainable, frozen, opt_state, batch)``. In a LoRA run ``trainable`` holds only
the adapters, so only they get gradients, optimizer state and checkpoints; the frozen base
weights double as the GRPO reference policy (adapters switched off).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from grouprank_jax.models.build import state_shardings
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, logical_to_spec

log = logging.getLogger(__name__)


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    min_lr_ratio: float = 0.0,
    schedule: str = "cosine",
) -> optax.GradientTransformation:
    """AdamW with linear warmup, then cosine decay to ``min_lr_ratio`` x peak (``"cosine"``) or a
    constant learning rate (``"constant"``, verl's default for PPO/GRPO actors), and global-norm
    clipping.

    Weight decay skips biases and norm scales (what HF's Trainer and PEFT exclude), found by name:
    the attention biases are 2-D here (``[heads, head_dim]``), so a rank test would decay them.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps - 1) if total_steps > 1 else 0
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup_steps else learning_rate,
            peak_value=learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=total_steps,
            end_value=learning_rate * min_lr_ratio,
        )
    elif schedule == "constant":
        # Always a schedule (never a bare float) so the optimizer state has the same structure,
        # with its step count, whichever schedule a checkpoint was written with.
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    else:
        raise ValueError(f"schedule={schedule!r}; choose 'cosine' or 'constant'")
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda path, x: x.ndim > 1 and decays(path), params)
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def decays(path) -> bool:
    """Whether weight decay applies to the parameter at this pytree path: not to biases or norms."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
    return not any(n == "bias" or n.endswith("norm") for n in names)


def trainable_filter(lora: bool):
    return nnx.LoRAParam if lora else nnx.Param


@dataclasses.dataclass
class TrainState:
    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    step: int
    rng: np.ndarray  # raw uint32 key data (Orbax stores key data, not typed keys)
    lora: bool

    @property
    def model(self):
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def checkpoint_tree(self) -> dict:
        return {
            "trainable": self.trainable.to_pure_dict(),
            "opt_state": self.opt_state,
            "step": np.asarray(self.step, np.int64),
            "rng": self.rng,
        }


def split_model(model, lora: bool):
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(lora), ...)
    return graphdef, trainable, frozen


def init_train_state(model, tx: optax.GradientTransformation, lora: bool, seed: int = 0) -> TrainState:
    graphdef, trainable, frozen = split_model(model, lora)
    if not jax.tree.leaves(trainable):
        raise ValueError("no trainable parameters: LoRA requested but the model has lora_rank=0")
    mesh = _mesh_of(trainable)
    init = (
        jax.jit(tx.init) if mesh is None else jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))
    )
    opt_state = init(trainable)
    # Host numpy, identical on every process: a process-local jax.Array would not save multi-process.
    rng = np.asarray(jax.random.key_data(jax.random.key(seed)))
    return TrainState(graphdef, trainable, frozen, opt_state, 0, rng, lora)


def _mesh_of(tree) -> Mesh | None:
    meshes = {
        leaf.sharding.mesh
        for leaf in jax.tree.leaves(tree)
        if isinstance(getattr(leaf, "sharding", None), NamedSharding)
    }
    return meshes.pop() if len(meshes) == 1 else None


def opt_state_shardings(tx: optax.GradientTransformation, trainable, mesh: Mesh):
    """``NamedSharding``s of ``tx.init(trainable)``: every moment on its parameter's sharding, the
    rest (Adam's step ``count``) replicated on the mesh, so that each leaf checkpoints and restores
    as a global array on every process. Explicit because the moments are ``zeros_like`` values
    that depend on no input: left to XLA they land on one device (a TPU compile from another
    host then counts them replicated on every chip). ``trainable`` may be abstract."""
    shapes = jax.eval_shape(tx.init, trainable)
    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        shapes,
        param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, jax.sharding.PartitionSpec()),
        is_leaf=is_sharding,
    )


def restore_target(state: TrainState) -> dict:
    """Abstract target (shapes, dtypes, current shardings) for restoring ``state``'s checkpoint."""

    def abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)

    return jax.tree.map(abstract, state.checkpoint_tree())


def apply_restored(state: TrainState, tree: dict) -> TrainState:
    trainable = state.trainable
    trainable.replace_by_pure_dict(tree["trainable"])
    return dataclasses.replace(
        state,
        trainable=trainable,
        opt_state=tree["opt_state"],
        step=int(np.asarray(tree["step"])),
        rng=np.asarray(tree["rng"]),
    )


def batch_sharding(mesh: Mesh | None, ndim: int, batch_axis: int = 0) -> NamedSharding | None:
    if mesh is None:
        return None
    names = [None] * ndim
    names[batch_axis] = "batch"
    return NamedSharding(mesh, logical_to_spec(names, None, mesh, LOGICAL_AXIS_RULES))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh | None, batch_axis: int = 0) -> dict[str, jax.Array]:
    """Host arrays -> global arrays with the batch dim over ``data x fsdp``.

    Single process: ``batch`` is the global batch. Multi-process: each process passes its own
    slice (grain per-process sharding) and the global array is assembled without any copy
    between hosts (``make_array_from_process_local_data``).
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim, batch_axis)
        if sharding is None:
            out[key] = jnp.asarray(value)
        elif jax.process_count() > 1:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = jax.device_put(value, sharding)
    return out


__all__ = [
    "TrainState",
    "apply_restored",
    "init_train_state",
    "make_optimizer",
    "restore_target",
    "shard_batch",
    "split_model",
    "state_shardings",
]
