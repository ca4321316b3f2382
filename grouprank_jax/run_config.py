"""``RunConfig``: one YAML file describes a whole run (model, mesh, SFT, GRPO, reward, data).

```yaml
model: {preset: qwen2.5-7b, dtype: bfloat16, param_dtype: float32, remat: full}
init_from: /path/to/hf_dir            # optional: HF directory or grouprank checkpoint
mesh: {data: 1, fsdp: -1, tensor: 1}
sft: {learning_rate: 3.0e-5, ...}      # SFTConfig fields
grpo: {rollouts_per_prompt: 8, ...}    # GRPOConfig fields
reward: {...}                         # RewardConfig fields
data: {sft_train: [...], rl_train: [...], ...}
```
Any field can be overridden on the command line as ``section.field=value``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from grouprank_jax.config import MeshConfig, ModelConfig, apply_overrides, from_dict, load_yaml, model_preset
from grouprank_jax.grouprank.reward import RewardConfig
from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.sft.config import SFTConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sft_train: tuple[str, ...] = ()  # JSONL/Parquet files of SFT records
    rl_train: tuple[str, ...] = ()  # JSONL/Parquet files of GroupRank records with gold labels
    eval_data: str | None = None  # a directory for `grouprank rerank` (corpus/queries/run/qrels)
    shuffle_seed: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()
    reward: RewardConfig = RewardConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    init_from: str | None = None
    run_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 1
    # XLA compiler options for every program the run compiles (the trainers' steps, the sampler),
    # e.g. {xla_tpu_enable_latency_hiding_scheduler: 'false'}; `grouprank compile` uses them too.
    xla_options: dict = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _model_from_dict(section: dict[str, Any] | None) -> ModelConfig:
    section = dict(section or {})
    preset = section.pop("preset", None)
    base = model_preset(preset) if preset else ModelConfig()
    return base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})


def run_config_from_dict(tree: dict[str, Any], where: str = "run config") -> RunConfig:
    tree = dict(tree)
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(tree) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {unknown}; allowed: {sorted(allowed)}")
    kwargs: dict[str, Any] = {}
    kwargs["model"] = _model_from_dict(tree.pop("model", None))
    sections = {"mesh": MeshConfig, "sft": SFTConfig, "grpo": GRPOConfig, "reward": RewardConfig,
                "data": DataConfig, "checkpoint": CheckpointConfig}
    for name, cls in sections.items():
        if name in tree:
            kwargs[name] = from_dict(cls, tree.pop(name), f"{where}: {name}")
    kwargs.update(tree)
    return RunConfig(**kwargs)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return run_config_from_dict(load_yaml(path, overrides), where=str(path))


def to_yaml_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["RunConfig", "DataConfig", "CheckpointConfig", "load_run_config", "run_config_from_dict", "apply_overrides"]
