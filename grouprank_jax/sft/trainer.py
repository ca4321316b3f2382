"""The SFT loop: records -> grain batches -> jitted steps on the mesh, with Orbax checkpoints
(params, optimizer, step, RNG, data-iterator position), exact resume and SIGTERM saves."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from grouprank_jax.run_config import RunConfig
from grouprank_jax.train_state import (
    apply_restored,
    init_train_state,
    restore_target,
    shard_batch,
)
from grouprank_jax.training import RunDir, load_initial_model, load_stage_records, rebuild_with_config, save_base_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupRankRender:
    """GroupRank record -> chat turn: the groupwise prompt and the ``<reason>/<answer>`` target.

    A class (not a closure) so grain can pickle it. Documents are kept in record order; the
    data generator shuffles them (paper-notes §5: documents are shuffled in the prompt).
    """

    preset: str = "grouprank"
    max_doc_chars: int = 3000
    default_reasoning: str = "I compare each document with the query and score its usefulness."

    def __call__(self, record: Mapping[str, Any]) -> dict[str, str]:
        from grouprank_jax.grouprank.prompts import build_messages, format_target, load_template

        if record.get("kind") == "chat" or record.get("prompt") is not None:
            return {"system": record.get("system"), "prompt": record["prompt"], "output": record["output"]}
        docs = [d["text"] if isinstance(d, Mapping) else str(d) for d in record["documents"]]
        messages = build_messages(record["query"], docs, load_template(self.preset), self.max_doc_chars)
        scores = [int(round(s)) for s in record["scores"]]
        reasoning = record.get("reasoning") or self.default_reasoning
        return {"system": messages[0]["content"], "prompt": messages[1]["content"], "output": format_target(scores, reasoning)}


@dataclasses.dataclass
class SFTResult:
    model: Any
    step: int
    metrics: list[dict]
    run_dir: Path


def _stack_accum(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """[accum * micro, T] -> [accum, micro, T] (the step scans over the leading axis)."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def train_sft(
    cfg: RunConfig,
    records: Sequence[Mapping[str, Any]] | None = None,
    tokenizer=None,
    mesh=None,
    model=None,
    max_steps: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> SFTResult:
    """Run (or resume) SFT in ``cfg.run_dir``.

    A ``model`` passed in is consumed: its parameter buffers are donated to the jitted step
    (no second copy of the weights); copy it first if you still need it.

    ``records``: canonical records (default: load ``cfg.data.sft_train``). ``max_steps`` caps
    the schedule length; ``stop_after`` ends the process-side loop early at that step, after
    the checkpoint, as a preemption would (used by the resume test).
    """
    from grouprank_jax.checkpoint import Checkpointer
    from grouprank_jax.data.pipeline import chat_tokenize_fn, pad_batch, sft_dataset
    from grouprank_jax.parallel.distributed import agree_max
    from grouprank_jax.metrics_log import MetricsLogger
    from grouprank_jax.preemption import PreemptionGuard
    from grouprank_jax.sft.step import loss_rows_bucket, make_sft_optimizer, make_sft_step
    from grouprank_jax.tokenizer import load_tokenizer

    sft = cfg.sft
    run_dir = RunDir(Path(cfg.run_dir))
    tokenizer = tokenizer or load_tokenizer()
    records = load_stage_records(records, cfg.data.sft_train, "sft", "sft_train")
    if model is None:
        model = load_initial_model(cfg.init_from, cfg.model, mesh, seed=cfg.seed)
    lora = sft.lora_rank > 0
    if lora:
        model = rebuild_with_config(model, model.cfg.replace(lora_rank=sft.lora_rank, lora_alpha=sft.lora_alpha), mesh, cfg.seed)
    save_base_weights(model, run_dir)

    accum = sft.grad_accum_steps
    # per_device_batch counts rows per batch shard (data x fsdp); tensor-parallel devices share rows.
    batch_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if (sft.per_device_batch * batch_shards) % jax.process_count():
        raise ValueError(f"{sft.per_device_batch * batch_shards} rows per micro-batch do not split over "
                         f"{jax.process_count()} processes")
    micro = sft.per_device_batch * batch_shards // jax.process_count()
    per_process_batch = micro * accum
    global_examples = per_process_batch * jax.process_count()
    steps_per_epoch = max(1, len(records) // global_examples)
    total_steps = sft.total_steps or max(1, math.ceil(sft.epochs * steps_per_epoch))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    tx = make_sft_optimizer(sft, total_steps)
    state = init_train_state(model, tx, lora=lora, seed=cfg.seed)
    render = GroupRankRender(sft.prompt_preset, sft.max_doc_chars)
    dataset = sft_dataset(
        records, chat_tokenize_fn(tokenizer, render), seq_len=sft.max_seq_len, batch_size=per_process_batch,
        seed=cfg.seed, packing=sft.packing, truncation="left", length_buckets=sft.length_buckets,
    )
    data_iter = iter(dataset)

    ckpt = Checkpointer(run_dir.checkpoints, save_every=cfg.checkpoint.save_every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(target=restore_target(state), data_iterator=data_iter)
        state = apply_restored(state, restored.state)
        log.info("resumed SFT from step %d", state.step)
    step_fn = make_sft_step(state.graphdef, tx, sft.loss_chunk_size, compiler_options=cfg.xla_options)
    logger = MetricsLogger(run_dir.root)
    history: list[dict] = []
    bar = _progress(progress, total_steps, state.step, "sft")
    try:
        with PreemptionGuard() as guard:
            while state.step < total_steps:
                t0 = time.perf_counter()
                host_batch = next(data_iter)
                if jax.process_count() > 1:  # one T for the global batch: bucket lengths can differ per process
                    host_batch = pad_batch(host_batch, agree_max(host_batch["input_ids"].shape[1]))
                host_batch = _stack_accum(host_batch, accum)
                k = None if sft.packing else agree_max(loss_rows_bucket(host_batch["loss_mask"]))
                batch = shard_batch(host_batch, mesh, batch_axis=1)
                trainable, opt_state, metrics = step_fn(state.trainable, state.frozen, state.opt_state, batch, k)
                state = dataclasses.replace(state, trainable=trainable, opt_state=opt_state, step=state.step + 1)
                metrics = {f"sft/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                metrics["sft/step_time_s"] = dt
                metrics["sft/tokens_per_s"] = metrics["sft/loss_tokens"] / dt
                logger.log(state.step, metrics)
                history.append({"step": state.step, **metrics})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")
                stopping = guard.should_stop or state.step == stop_after
                ckpt.save(state.step, state.checkpoint_tree(), data_iterator=data_iter,
                          force=stopping or state.step == total_steps)
                if stopping:
                    log.warning("stopping at step %d (%s); checkpoint saved", state.step,
                                "preempted" if guard.should_stop else "stop_after")
                    break
    finally:
        bar.close()
        ckpt.close()
        logger.close()
    return SFTResult(model=state.model, step=state.step, metrics=history, run_dir=run_dir.root)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, mininterval=float(os.environ.get("GROUPRANK_PROGRESS_INTERVAL", "1.0")))
