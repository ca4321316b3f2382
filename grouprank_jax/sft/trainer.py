"""The SFT stage: records -> grain batches -> the jitted SFT step, run by the one training loop
(``training/loop.py``: restore, preemption-guarded step/log/checkpoint, close)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grouprank_jax.config.run import RunConfig
from grouprank_jax.config.yaml_io import to_dict
from grouprank_jax.data.pipeline import chat_tokenize_fn, packed_rows, pad_batch, sft_dataset, sft_token_lengths
from grouprank_jax.parallel.distributed import agree_max
from grouprank_jax.sft.render import GroupRankRender
from grouprank_jax.sft.step import loss_rows_bucket, make_sft_optimizer, make_sft_step
from grouprank_jax.task.prompts import load_template
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.training.loop import TrainResult, train_loop
from grouprank_jax.training.run_dir import RunDir, save_base_weights, stage_records
from grouprank_jax.training.state import init_train_state, shard_batch
from grouprank_jax.weights.loading import initial_model, merge_lora, resumed_base, with_lora

log = logging.getLogger(__name__)


def _stack_accum(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """[accum * micro, T] -> [accum, micro, T] (the step accumulates over the leading axis)."""
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
) -> TrainResult:
    """Run (or resume) SFT in ``cfg.run_dir``.

    A ``model`` passed in is consumed: its parameter buffers are donated to the jitted step
    (no second copy of the weights); copy it first if you still need it. ``records``: canonical
    records (default: ``cfg.data.sft_train``). ``max_steps`` caps the schedule length;
    ``stop_after`` ends the loop at that step after its checkpoint, as a preemption would.
    """
    sft = cfg.sft
    run_dir = RunDir(Path(cfg.run_dir))
    tokenizer = tokenizer or load_tokenizer()
    records = stage_records(records, cfg.data.sft_train, "sft", "sft_train")
    load_template(cfg.prompt.preset)  # a bad preset fails here, not after the model is built
    render = GroupRankRender(cfg.prompt.preset, cfg.prompt.max_doc_chars)
    tokenize_fn = chat_tokenize_fn(tokenizer, render)
    lengths, full = sft_token_lengths(records, tokenize_fn, sft.max_seq_len, sft.truncation)  # all checked
    cut = int((full > sft.max_seq_len).sum())
    if cut:
        log.warning(
            "sft: %d of %d records exceed sft.max_seq_len=%d and are cut (sft.truncation=%s)",
            cut,
            len(records),
            sft.max_seq_len,
            sft.truncation,
        )
    if model is None:
        resumed = resumed_base(run_dir.root, cfg.model, mesh) if sft.lora_rank > 0 else None
        model = resumed or initial_model(cfg.init_from, cfg.model, mesh, seed=cfg.seed)
    elif model.cfg.lora_rank:  # a LoRA-trained model passed in starts merged, as it would from init_from
        model = merge_lora(model, mesh)
    lora = sft.lora_rank > 0
    if lora:
        model = with_lora(model, sft.lora_rank, sft.lora_alpha, sft.lora_targets, mesh, cfg.seed)
    save_base_weights(model, run_dir)

    # per_device_batch counts rows per batch shard (data x fsdp); tensor-parallel devices share rows.
    batch_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if (sft.per_device_batch * batch_shards) % jax.process_count():
        raise ValueError(
            f"sft.per_device_batch x data*fsdp = {sft.per_device_batch * batch_shards} rows per "
            f"micro-batch do not split over {jax.process_count()} processes"
        )
    per_process_batch = sft.per_device_batch * batch_shards // jax.process_count() * sft.grad_accum_steps
    # An epoch in rows: with packing, several records share a row.
    rows_per_epoch = packed_rows(lengths, sft.max_seq_len) if sft.packing else len(records)
    steps_per_epoch = max(1, rows_per_epoch // (per_process_batch * jax.process_count()))
    total_steps = sft.total_steps or max(1, math.ceil(sft.epochs * steps_per_epoch))
    total_steps = total_steps if max_steps is None else min(total_steps, max_steps)
    tx = make_sft_optimizer(sft, total_steps)
    state = init_train_state(model, tx, lora=lora, seed=cfg.seed)
    data_iter = iter(
        sft_dataset(
            records,
            tokenize_fn,
            seq_len=sft.max_seq_len,
            batch_size=per_process_batch,
            seed=cfg.seed,
            packing=sft.packing,
            truncation=sft.truncation,
            length_buckets=sft.length_buckets,
        )
    )
    step_fn = make_sft_step(state.graphdef, tx, cfg.model.loss_chunk_size, compiler_options=cfg.xla_options)

    def sft_step(state, host_batch):
        t0 = time.perf_counter()
        if jax.process_count() > 1:  # one T for the global batch: bucket lengths can differ per process
            host_batch = pad_batch(host_batch, agree_max(host_batch["input_ids"].shape[1]))
        host_batch = _stack_accum(host_batch, sft.grad_accum_steps)
        k = None if sft.packing else agree_max(loss_rows_bucket(host_batch["loss_mask"]))
        trainable, opt_state, metrics = step_fn(
            state.trainable, state.frozen, state.opt_state, shard_batch(host_batch, mesh, batch_axis=1), k
        )
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["tokens_per_s"] = metrics["loss_tokens"] / (time.perf_counter() - t0)
        return dataclasses.replace(state, trainable=trainable, opt_state=opt_state), metrics

    return train_loop(
        "sft",
        state,
        data_iter,
        total_steps,
        sft_step,
        run_dir=run_dir,
        checkpoint=cfg.checkpoint,
        stop_after=stop_after,
        progress=progress,
        config=to_dict(cfg),
        data_batch=per_process_batch,
        postfix="loss",
    )
