"""The one training loop: restore, then preemption-guarded step / log / checkpoint, then close.

SFT and GRPO supply only their state, data iterator and step function (``sft/trainer.py``,
``rl/trainer.py``). A checkpoint holds the train state (params or adapters, optimizer, step,
RNG key data) and the grain iterator position, so a restart resumes on the next batch; SIGTERM
(TPU preemption) finishes the step, saves and returns normally.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from grouprank_jax.checkpoint import Checkpointer
from grouprank_jax.log_setup import run_log
from grouprank_jax.metrics_log import MetricsLogger
from grouprank_jax.preemption import PreemptionGuard
from grouprank_jax.training.run_dir import RunDir
from grouprank_jax.training.state import TrainState, apply_restored, restore_target

log = logging.getLogger(__name__)

# (state, batch) -> (state after the step's updates, metrics of the step without the stage prefix)
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, float]]]


@dataclasses.dataclass
class TrainResult:
    model: Any
    step: int
    metrics: list[dict]
    run_dir: Path


def progress_bar(enabled: bool, total: int, initial: int, desc: str):

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled or jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=float(os.environ.get("GROUPRANK_PROGRESS_INTERVAL", "1.0")),
    )


def train_loop(
    stage: str,
    state: TrainState,
    data_iter: Iterator,
    total_steps: int,
    step_fn: StepFn,
    *,
    run_dir: RunDir,
    checkpoint,
    stop_after: int | None = None,
    progress: bool = True,
    postfix: str = "loss",
    config: Mapping[str, Any] | None = None,
    data_batch: int | None = None,
) -> TrainResult:
    """Run ``step_fn`` until ``total_steps`` (resuming from ``run_dir``'s latest checkpoint).

    ``checkpoint`` is a ``CheckpointConfig``. ``stop_after`` ends the loop at that step after the
    checkpoint, as a preemption would. Metrics are logged as ``{stage}/{name}`` with the step's
    wall time; ``postfix`` names the metric the progress bar shows. Every log record of the run,
    third-party ones included, goes to ``run_dir/run.log``.

    ``config`` (the run config as a dict) is saved with every checkpoint beside ``total_steps``
    and the process count and ``data_batch`` (what one step takes from each process's data
    iterator: rows, or prompts). A resume refuses another process count or data batch (the data
    position is saved per process, in batches) and warns, naming each key, when the config or
    the schedule length changed.
    """
    meta = {"config": dict(config or {}), "total_steps": int(total_steps), "process_count": jax.process_count()}
    if data_batch is not None:
        meta["data_batch"] = int(data_batch)
    meta = json.loads(json.dumps(meta))  # as a checkpoint gives it back (tuples as lists), to compare
    with run_log(run_dir.log_file):
        return _loop(stage, state, data_iter, step_fn, run_dir, checkpoint, stop_after, progress, postfix, meta)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: Path, step: int) -> None:
    """Refuse what cannot resume, warn about what resumes differently (see ``train_loop``)."""
    if not saved:
        return  # a checkpoint written before this metadata existed
    if saved.get("process_count", current["process_count"]) != current["process_count"]:
        raise ValueError(
            f"{where}: step {step} was saved by {saved['process_count']} processes, this run has "
            f"{current['process_count']}; the data position is stored per process, so resume with "
            f"{saved['process_count']} processes (or start a new run_dir with init_from={where.parent})"
        )
    if saved.get("data_batch", current.get("data_batch")) != current.get("data_batch"):
        raise ValueError(
            f"{where}: step {step} was saved with a data batch of {saved['data_batch']} per process per "
            f"step, this run's is {current['data_batch']} (sft: per_device_batch x data*fsdp devices / "
            "processes x grad_accum_steps; grpo: global_batch_prompts / processes); the data position is "
            "counted in batches, so resume with the same batch and device count (or start a new run_dir "
            f"with init_from={where.parent})"
        )
    before = _flat({"config": saved.get("config", {}), "total_steps": saved.get("total_steps")})
    after = _flat({"config": current["config"], "total_steps": current["total_steps"]})
    changed = [
        f"{k.removeprefix('config.')}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k) and not k.startswith("config.run_dir")
    ]
    if changed:
        schedule = before.get("total_steps") != after.get("total_steps")
        hint = " (total_steps sets the LR schedule: pass the same --max-steps)" if schedule else ""
        log.warning(
            "resuming step %d of %s with settings that differ from its checkpoint%s: %s",
            step,
            where.parent,
            hint,
            "; ".join(changed),
        )


def _loop(stage, state, data_iter, step_fn, run_dir, checkpoint, stop_after, progress, postfix, meta):
    total_steps = meta["total_steps"]
    ckpt = Checkpointer(
        run_dir.checkpoints, save_every=checkpoint.save_every, keep=checkpoint.keep, async_save=checkpoint.async_save
    )
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            saved_meta = ckpt.read_metadata(latest)
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # damage: the restore falls back past it
            log.warning("checkpoint step %d: metadata unreadable (%s); resuming without the config check", latest, err)
            saved_meta = None
        check_resume(saved_meta, meta, run_dir.checkpoints, latest)
        state = apply_restored(state, ckpt.restore(target=restore_target(state), data_iterator=data_iter).state)
        log.info("%s: resumed from step %d", stage, state.step)
    logger = MetricsLogger(run_dir.root, resume_step=state.step)
    history: list[dict] = []
    bar = progress_bar(progress, total_steps, state.step, stage)
    try:
        # SIGTERM (preemption) and Ctrl-C both finish the step and save; Ctrl-C then interrupts.
        with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
            while state.step < total_steps:
                t0 = time.perf_counter()
                state, step_metrics = step_fn(state, next(data_iter))
                state = dataclasses.replace(state, step=state.step + 1)
                metrics = {f"{stage}/{k}": v for k, v in step_metrics.items()}
                metrics[f"{stage}/step_time_s"] = time.perf_counter() - t0
                logger.log(state.step, metrics)
                history.append({"step": state.step, **metrics})
                bar.update(1)
                bar.set_postfix({postfix: f"{step_metrics[postfix]:.3f}"})
                stopping = guard.should_stop or state.step == stop_after
                ckpt.save(
                    state.step,
                    state.checkpoint_tree(),
                    data_iterator=data_iter,
                    metadata=meta,
                    force=stopping or state.step == total_steps,
                )
                if stopping:
                    log.warning(
                        "%s: stopping at step %d (%s); checkpoint saved",
                        stage,
                        state.step,
                        "preempted" if guard.should_stop else "stop_after",
                    )
                    if guard.received == signal.SIGINT:
                        ckpt.wait()  # the save is on disk before the interrupt unwinds
                        raise KeyboardInterrupt
                    break
            # The last (forced) save commits while the guard still holds: a second SIGTERM now
            # would otherwise kill the write and lose every step since the previous checkpoint.
            ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
        logger.close()
    return TrainResult(model=state.model, step=state.step, metrics=history, run_dir=run_dir.root)
