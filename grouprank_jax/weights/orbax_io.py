"""Plain Orbax checkpoints of a model's parameters (``grouprank import-hf`` output).

Layout: ``DIR/model_config.json`` (our ``ModelConfig``) and ``DIR/params`` (an Orbax
StandardCheckpointer tree of the NNX parameter state). Training checkpoints
(``checkpoint.py``) store the same parameter tree under their step directories.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.build import state_shardings
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, single_device_mesh

CONFIG_FILE = "model_config.json"


def save_params(model: Qwen2ForCausalLM, directory: str | Path) -> Path:

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", params, force=True)
    if jax.process_index() == 0:
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    return directory


def read_model_config(directory: str | Path, **overrides) -> ModelConfig:
    file = Path(directory) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"{file} not found: expected a grouprank checkpoint directory (made by `grouprank import-hf` or training)"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}:{err.lineno}: invalid JSON ({err.msg})") from None
    data.update(overrides)
    return ModelConfig(**data)


def abstract_model(cfg: ModelConfig, mesh: Mesh | None):
    return nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=LOGICAL_AXIS_RULES))


def restore_target(state: nnx.State, mesh: Mesh | None) -> dict:
    """A pure-dict Orbax target for ``state``'s variables: their shapes and dtypes, laid out on
    ``mesh`` (one device if None), so a restore reshards whatever device set saved them."""
    shardings = state_shardings(state, mesh or single_device_mesh())
    return jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    ).to_pure_dict()


def load_params(
    directory: str | Path, mesh: Mesh | None = None, params_dir: str | Path | None = None, **overrides
) -> Qwen2ForCausalLM:
    """Restore a model onto ``mesh`` (any mesh shape: Orbax reshards on restore)."""

    directory = Path(directory).absolute()
    cfg = read_model_config(directory, **overrides)
    abstract = abstract_model(cfg, mesh)
    graphdef, state = nnx.split(abstract)
    target = restore_target(nnx.state(abstract, nnx.Param), mesh)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(Path(params_dir or directory / "params").absolute(), target)
    state.replace_by_pure_dict(restored)
    return nnx.merge(graphdef, state)
