"""Building models already sharded on a mesh (params never gathered on one device)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, Rules, named_sharding


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding of one parameter from its ``logical_axes`` metadata (replicated if none)."""
    value = variable.get_value()
    names = variable.get_metadata().get("logical_axes")
    return named_sharding(mesh, names, value.shape, rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """A pytree of NamedShardings matching ``state`` (for jit out_shardings / Orbax targets)."""
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh, rules),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def create_model(
    cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0, rules: Rules = LOGICAL_AXIS_RULES
) -> Qwen2ForCausalLM:
    """Random-init model; with a mesh, each parameter is created directly on its shards."""
    if mesh is None or mesh.size == 1:
        return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules)
        state = nnx.state(model)
        return jax.lax.with_sharding_constraint(state, shardings)

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_sharded_model(cfg: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Qwen2ForCausalLM:
    """The model with ``jax.ShapeDtypeStruct`` parameters that carry their ``NamedSharding``s:
    what ``jit(...).lower`` needs to compile for ``mesh`` (any devices, e.g. a TPU slice
    described on a CPU host) without allocating a single weight."""
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        variable.set_value(
            jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=variable_sharding(variable, mesh, rules))
        )
    return model


def shard_model(model: Qwen2ForCausalLM, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Qwen2ForCausalLM:
    """Place an existing model's params on ``mesh``; its calls then constrain activations to it."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    new = nnx.merge(graphdef, state)
    new.mesh, new.rules = mesh, rules
    return new
