"""Frozen configuration dataclasses. Each setting has one owner: the model's shape and numerics
(``model.py``), the mesh (``mesh.py``), a whole run (``run.py``: sections for the model, mesh,
prompt, SFT, GRPO, reward, data and checkpoints); task configs live beside their code
(``RewardConfig`` in ``task/reward.py``, ``GRPOConfig`` in ``rl/config.py``, ``SFTConfig`` in
``sft/config.py``, ``SamplingParams`` in ``sampling/params.py``)."""

from grouprank_jax.config.mesh import MeshConfig
from grouprank_jax.config.model import (
    ATTENTION_IMPLS,
    LORA_TARGETS,
    MODEL_PRESETS,
    REMAT_POLICIES,
    ModelConfig,
    model_preset,
)
from grouprank_jax.config.yaml_io import apply_overrides, from_dict, load_yaml, to_dict

__all__ = [
    "ATTENTION_IMPLS",
    "LORA_TARGETS",
    "MODEL_PRESETS",
    "REMAT_POLICIES",
    "MeshConfig",
    "ModelConfig",
    "apply_overrides",
    "from_dict",
    "load_yaml",
    "model_preset",
    "to_dict",
]
