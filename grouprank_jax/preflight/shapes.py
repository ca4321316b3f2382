"""A model's parameters and their per-chip sizes on a mesh, from the config alone.

The inventory (``model_params``) comes from an abstract model (``nnx.eval_shape``: nothing is
allocated), and the per-chip split applies the one logical-axis rules table the real sharding
uses (``parallel/mesh.py``), so the planner's arithmetic follows the model code. Used by the
memory estimates (``memory.py``) and the divisibility checks of ``grouprank plan``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import jax.numpy as jnp
from flax import nnx

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, logical_to_spec


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    itemsize: int
    lora: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@functools.lru_cache(maxsize=16)
def model_params(cfg: ModelConfig) -> tuple[ParamInfo, ...]:
    """Every Variable's shape and logical axes, from an abstract (never allocated) model."""

    # Decoder layers are identical modules, so one is built and its Variables repeated per layer:
    # tracing 64 abstract layers costs ~8 s, one costs ~0.2 s, and the shapes are the same.
    one = cfg.replace(num_layers=1)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(one, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes") or (None,) * len(value.shape)
        names = [path] if path[0] != "layers" else [("layers", i, *path[2:]) for i in range(cfg.num_layers)]
        out += [
            ParamInfo(
                "/".join(map(str, p)),
                tuple(value.shape),
                tuple(axes),
                jnp.dtype(value.dtype).itemsize,
                isinstance(var, nnx.LoRAParam),
            )
            for p in names
        ]
    return tuple(out)


def _spec_mesh(mesh_shape: dict[str, int]):
    # logical_to_spec only reads ``mesh.shape``; a stand-in lets us plan meshes of any size
    # without the devices, using exactly the dropping rule the real sharding uses.
    return types.SimpleNamespace(shape=dict(mesh_shape))


def shard_factor(axes, shape, mesh_shape: dict[str, int], rules=LOGICAL_AXIS_RULES) -> int:
    spec = logical_to_spec(axes, shape, _spec_mesh(mesh_shape), rules)
    factor = 1
    for entry in spec:
        for axis in entry if isinstance(entry, tuple) else (entry,) if entry else ():
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
            by = (
                f"{axes[0]}={size}"
                if len(axes) == 1
                else ("*".join(axes) + f"={size} (" + ", ".join(f"{a}={mesh_shape[a]}" for a in axes) + ")")
            )
            out.append(f"{name}={dim} is not divisible by {by}")
    return out


def local_dim(dim: int, axis_rule: str, mesh_shape: dict[str, int]) -> int:
    return dim // shard_factor((axis_rule,), (dim,), mesh_shape)


def dtype_bytes(name: str) -> int:
    return jnp.dtype(name).itemsize


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model's per-chip sizes on one mesh."""

    cfg: ModelConfig
    mesh_shape: dict
    lora: bool

    @functools.cached_property
    def params(self) -> tuple[ParamInfo, ...]:
        return model_params(self.cfg)

    def local_count(self, p: ParamInfo) -> float:
        return p.size / shard_factor(p.axes, p.shape, self.mesh_shape)

    @property
    def a(self) -> int:
        return dtype_bytes(self.cfg.dtype)

    @functools.cached_property
    def param_bytes(self) -> float:
        return sum(self.local_count(p) * p.itemsize for p in self.params)

    @functools.cached_property
    def trainable_count(self) -> float:
        return sum(self.local_count(p) for p in self.params if p.lora or not self.lora)

    @functools.cached_property
    def frozen_count(self) -> float:
        return sum(self.local_count(p) for p in self.params if not p.lora)

    @functools.cached_property
    def trainable_bytes(self) -> float:
        """The trained parameters in their own dtype: also the size of their gradients, of the
        frozen KL reference copy, and of each AdamW moment (optax keeps mu and nu in the
        parameters' dtype: bf16 parameters have bf16 moments)."""
        return sum(self.local_count(p) * p.itemsize for p in self.params if p.lora or not self.lora)

    @property
    def opt_bytes(self) -> float:
        return 2 * self.trainable_bytes  # AdamW mu + nu

    def gathered_layer_bytes(self, layers: int) -> float:
        """``layers`` decoder layers' weights in the compute dtype, gathered over fsdp (FSDP
        all-gathers them for each matmul; tensor sharding stays)."""
        no_fsdp = {**self.mesh_shape, "fsdp": 1}
        per_layer = sum(
            p.size / shard_factor(p.axes, p.shape, no_fsdp)
            for p in self.params
            if p.path.startswith("layers/0/") and not p.lora
        )
        return layers * per_layer * self.a

    @functools.cached_property
    def head_count(self) -> float:
        """Local entries of the output projection (the embedding when tied)."""
        name = "embed" if self.cfg.tie_word_embeddings else "lm_head"
        return sum(self.local_count(p) for p in self.params if p.path == name)

    @functools.cached_property
    def embedding_gather_bytes(self) -> float:
        """The embedding table gathered over fsdp for the token lookup (XLA all-gathers the table
        in the param dtype; only the vocab stays split over tensor)."""
        (embed,) = [p for p in self.params if p.path == "embed"]
        no_fsdp = {**self.mesh_shape, "fsdp": 1}
        return embed.size / shard_factor(embed.axes, embed.shape, no_fsdp) * embed.itemsize

    @property
    def dims(self):
        ms, c = self.mesh_shape, self.cfg
        return types.SimpleNamespace(
            d=c.hidden_size,
            h=c.head_dim,
            L=c.num_layers,
            n=local_dim(c.num_heads, "heads", ms),
            k=local_dim(c.num_kv_heads, "kv_heads", ms),
            f=local_dim(c.intermediate_size, "mlp", ms),
            v=local_dim(c.vocab_size, "vocab", ms),
        )
