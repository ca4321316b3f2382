"""``RunConfig``: one YAML file describes a whole run (model, mesh, prompt, SFT, GRPO, reward,
data, checkpoints).

```yaml
model: {preset: qwen2.5-7b, dtype: bfloat16, param_dtype: float32, remat: full}
init_from: /path/to/hf_dir            # optional: HF directory or grouprank checkpoint
mesh: {data: 1, fsdp: -1, tensor: 1}
prompt: {preset: grouprank}           # the groupwise prompt both stages train on
sft: {learning_rate: 3.0e-5, ...}      # SFTConfig fields
grpo: {rollouts_per_prompt: 8, ...}    # GRPOConfig fields
reward: {...}                         # RewardConfig fields
data: {sft_train: [...], rl_train: [...]}
xla_options: {...}                    # XLA compiler options of every compiled program
```
Any field can be overridden on the command line as ``section.field=value``. Every key is read
by something: an unknown key (a typo in a pod config) is an error that names it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grouprank_jax.config.mesh import MeshConfig
from grouprank_jax.config.model import ModelConfig, model_preset
from grouprank_jax.config.yaml_io import coerce, field_types, from_dict, load_yaml
from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.sft.config import SFTConfig
from grouprank_jax.task.reward import RewardConfig


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """The groupwise prompt, shared by SFT, GRPO and the demo's evaluation."""

    preset: str = "grouprank"  # the released checkpoints' prompt (paper-notes §1); or a YAML/JSON file
    max_doc_chars: int = 3000  # [paper-notes §1] character cut per document


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sft_train: tuple[str, ...] = ()  # JSONL/Parquet files of SFT records
    rl_train: tuple[str, ...] = ()  # JSONL/Parquet files of GroupRank records with gold labels


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 100
    keep: int = 3
    async_save: bool = True


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    prompt: PromptConfig = PromptConfig()
    sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()
    reward: RewardConfig = RewardConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    init_from: str | None = None
    run_dir: str = "runs/default"
    seed: int = 0
    # XLA compiler options for every program the run compiles (the trainers' steps, the sampler),
    # e.g. {xla_tpu_enable_latency_hiding_scheduler: false}; `grouprank compile` uses them too.
    xla_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("run_dir", "init_from"):
            value = getattr(self, name)
            if value is not None and _URL.match(str(value)):
                # pathlib would turn gs://b/x into the local directory gs:/b/x: every checkpoint
                # would land on the VM's own disk and vanish with it.
                raise ValueError(
                    f"{name}={value!r}: run directories are read and written through the file system; "
                    "mount the bucket on every host (e.g. `gcsfuse --implicit-dirs my-bucket /tmp/gcs`) "
                    f"and pass the mounted path, e.g. {name}=/tmp/gcs/{str(value).split('://', 1)[1].split('/', 1)[-1]}"
                )

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _model_from_dict(section: dict[str, Any] | None, where: str) -> ModelConfig:
    if section is not None and not isinstance(section, Mapping):
        raise ValueError(f"{where}: model: expected a mapping of keys, got {section!r} ({type(section).__name__})")
    section = dict(section or {})
    preset = section.pop("preset", None)
    allowed = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{where}: model: unknown keys {unknown}; allowed: ['preset'] + {sorted(allowed)}")
    hints = field_types(ModelConfig)
    values = {k: coerce(v, hints.get(k, Any), f"{where}: model.{k}") for k, v in section.items()}
    # The stages add their own adapters, so a model-level value would be ignored; the defaults
    # pass, so that a dumped config (``to_dict``) loads back.
    default = ModelConfig()
    per_stage = sorted(k for k, v in values.items() if k.startswith("lora_") and v != getattr(default, k))
    if per_stage:
        raise ValueError(
            f"{where}: model.{per_stage[0]} is set per stage: use sft.{per_stage[0]} / grpo.{per_stage[0]} "
            "(grpo.lora_enabled switches RL's adapters)"
        )
    try:
        base = model_preset(preset) if preset else ModelConfig()
    except KeyError as err:  # the preset's own message lists the known ones
        raise ValueError(f"{where}: model.preset: {err.args[0]}") from None
    return base.replace(**values)


def run_config_from_dict(tree: dict[str, Any], where: str = "run config") -> RunConfig:
    try:
        return _run_config_from_dict(tree, where)
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from None  # a section's own check: name the file too


def _run_config_from_dict(tree: dict[str, Any], where: str) -> RunConfig:
    tree = dict(tree)
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(tree) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {unknown}; allowed: {sorted(allowed)}")
    kwargs: dict[str, Any] = {"model": _model_from_dict(tree.pop("model", None), where)}
    sections = {
        "mesh": MeshConfig,
        "prompt": PromptConfig,
        "sft": SFTConfig,
        "grpo": GRPOConfig,
        "reward": RewardConfig,
        "data": DataConfig,
        "checkpoint": CheckpointConfig,
    }
    for name, cls in sections.items():
        if name in tree:
            kwargs[name] = from_dict(cls, tree.pop(name), f"{where}: {name}")
    if "xla_options" in tree and not isinstance(tree["xla_options"], dict):
        raise ValueError(f"{where}: xla_options must be a mapping of XLA flag -> value")
    hints = field_types(RunConfig)
    kwargs.update({k: coerce(v, hints.get(k, Any), f"{where}: {k}") for k, v in tree.items()})
    return RunConfig(**kwargs)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return run_config_from_dict(load_yaml(path, overrides), where=str(path))


__all__ = ["CheckpointConfig", "DataConfig", "PromptConfig", "RunConfig", "load_run_config", "run_config_from_dict"]
