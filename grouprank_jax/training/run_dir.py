"""A training run's directory and what a stage writes there before its first step.

Layout: ``model_config.json`` (the trained model's ``ModelConfig``), ``checkpoints/<step>/``
(Orbax), ``base/params`` (a LoRA run's frozen full weights, which export merges the adapters
into), ``metrics.jsonl``, ``tb/`` (TensorBoard), ``run.log`` (every log record, third-party
INFO included; ``run.<i>.log`` for process i > 0) and the curves PNG.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax

from grouprank_jax.data.records import iter_records
from grouprank_jax.parallel.distributed import agree_max
from grouprank_jax.weights.loading import SHAPE_FIELDS, rebuild_with_config
from grouprank_jax.weights.orbax_io import CONFIG_FILE, save_params

log = logging.getLogger(__name__)


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

    @property
    def log_file(self) -> Path:
        """``run.log`` for process 0, ``run.<i>.log`` for process i: appends from several hosts to
        one file of a shared (e.g. bucket-mounted) file system overwrite each other."""
        index = jax.process_index()
        return self.root / ("run.log" if index == 0 else f"run.{index}.log")

    def prepare(self) -> None:
        if jax.process_index() == 0:
            self.root.mkdir(parents=True, exist_ok=True)


# ModelConfig fields that decide what a checkpoint holds (shapes, adapters, parameter math);
# the others (compute dtype, attention kernel, remat, chunk sizes) may change between resumes.
WEIGHT_FIELDS = (*SHAPE_FIELDS, "rope_theta", "rms_norm_eps", "param_dtype", "lora_rank", "lora_alpha", "lora_targets")


def check_model_config(model_cfg, run_dir: RunDir) -> None:
    """Refuse a model that differs, in what its weights are, from the one this run's checkpoints
    hold (``model_config.json``), before anything is written: the file is what export, rerank
    and ``init_from`` load the checkpoints with, so overwriting it would strand them."""
    path = run_dir.root / CONFIG_FILE
    has_steps = run_dir.checkpoints.is_dir() and any(p.name.isdigit() for p in run_dir.checkpoints.iterdir())
    if not (has_steps and path.exists()):
        return
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # tuples as lists, as saved
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in WEIGHT_FIELDS if saved.get(k) != now[k]]
    if changed:
        raise ValueError(
            f"{run_dir.root} holds checkpoints of another model ({'; '.join(changed)}); resume with the "
            f"settings in {path}, or start a new run_dir (init_from={run_dir.root} continues from it)"
        )


def save_base_weights(model, run_dir: RunDir, keep_base: bool | None = None) -> None:
    """Write ``model_config.json`` and, once, the full weights the run starts from
    (``base/params``): for a LoRA run (default) the frozen weights it adapts, which export merges
    the adapters into; with ``keep_base`` also for full fine-tuning, where they are GRPO's KL
    reference, so a resume uses that reference even if ``init_from`` has changed since.
    A run dir whose checkpoints hold another model is refused first (``check_model_config``)."""
    check_model_config(model.cfg, run_dir)
    run_dir.prepare()
    keep_base = bool(model.cfg.lora_rank) if keep_base is None else keep_base
    # Every process must take the same branch (the save is collective): ask process 0 only.
    missing = int(jax.process_index() == 0 and not (run_dir.base / "params").exists())
    if keep_base and agree_max(missing):
        base = model  # without adapters the model is its own base: no on-device copy of a full model
        if model.cfg.lora_rank:
            base = rebuild_with_config(model, model.cfg.replace(lora_rank=0), model.mesh, 0)
        save_params(base, run_dir.base)
    if jax.process_index() == 0:
        (run_dir.root / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")


def stage_records(records, files, purpose: str, key: str) -> list:
    """The records a stage trains on: ``records`` when given, else the validated ``files``."""
    if records is not None:
        return list(records)
    if not files:
        raise ValueError(f"no {purpose.upper()} data: set data.{key} to JSONL/Parquet files")
    loaded = list(iter_records(list(files), purpose=purpose))
    if not loaded:
        raise ValueError(f"data.{key}: {', '.join(map(str, files))} holds no records")
    return loaded
