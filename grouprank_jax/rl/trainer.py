"""The GRPO loop (paper §3.3 / Table 10): per step, B prompts -> G rollouts each from the
shared-weight sampler -> parse -> jitted reward -> group advantages -> policy update(s).

Trainer and sampler read the same parameter arrays (collocated on one mesh). With LoRA the
reference policy is the same weights with the adapters off; with full fine-tuning it is a
frozen copy of the initial weights (only kept when ``kl_coef > 0``).

Multi-process: each process loads its slice of every global batch (``rl_dataset``), samples,
parses and rewards its own prompts' rollouts (a prompt's G rollouts never leave its process, so
group advantages are local), and the update runs on global arrays over the whole mesh. Shapes
(prompt and completion buckets) are agreed across processes; every random choice is keyed by
the global row, so the run does not depend on the process count. Metrics are computed from the
gathered per-rollout values; only process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grouprank_jax.parallel.distributed import agree_max, gather_rows, global_sum
from grouprank_jax.parallel.mesh import per_chip_bytes, tpu_reserved_hbm_options
from grouprank_jax.rl.advantages import group_advantages
from grouprank_jax.rl.losses import loss_kwargs
from grouprank_jax.rl.rollout import build_prompts, sample_group, score_rollouts
from grouprank_jax.rl.step import make_grpo_optimizer, make_grpo_update, make_logprob_fn
from grouprank_jax.run_config import RunConfig
from grouprank_jax.train_state import apply_restored, init_train_state, restore_target, shard_batch
from grouprank_jax.training import RunDir, load_initial_model, load_stage_records, rebuild_with_config, save_base_weights

log = logging.getLogger(__name__)

STOP_STRING = "</answer>"  # the output format's last tag: nothing useful follows it


@dataclasses.dataclass
class GRPOResult:
    model: Any
    step: int
    metrics: list[dict]
    run_dir: Path


def _bucket(n: int, smallest: int, largest: int) -> int:
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest) if largest >= n else n


def _assemble_rows(tokenizer, prompts: Sequence[str], out, G: int, pad_id: int, prompt_buckets: Sequence[int], max_new: int):
    """Left-padded prompts + right-padded completions as one [R, P + C] row per rollout
    (P and C agreed across processes: the update is one computation over all of them)."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    longest = agree_max(max(len(e) for e in encoded))
    P = next((b for b in sorted(prompt_buckets) if b >= longest), longest)
    C = _bucket(agree_max(int(out.lengths.max())), 16, max_new)
    R = len(prompts) * G
    seq_ids = np.full((R, P + C), pad_id, np.int32)
    seq_mask = np.zeros((R, P + C), np.int32)
    for i, ids in enumerate(encoded):
        rows = slice(i * G, (i + 1) * G)
        seq_ids[rows, P - len(ids):P] = ids
        seq_mask[rows, P - len(ids):P] = 1
    completion_mask = out.mask[:, :C].astype(np.int32)
    seq_ids[:, P:] = np.where(completion_mask, out.tokens[:, :C], pad_id)
    seq_mask[:, P:] = completion_mask
    old_logp = np.where(completion_mask, out.logprobs[:, :C], 0.0).astype(np.float32)
    return P, {"seq_ids": seq_ids, "seq_mask": seq_mask, "completion_mask": completion_mask, "old_logp": old_logp}


def train_grpo(
    cfg: RunConfig,
    records: Sequence[Mapping[str, Any]] | None = None,
    tokenizer=None,
    mesh=None,
    model=None,
    max_steps: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    prompt_preset: str | None = None,
) -> GRPOResult:
    """Run (or resume) GRPO in ``cfg.run_dir``; a ``model`` passed in is consumed (donated)."""
    from grouprank_jax.checkpoint import Checkpointer
    from grouprank_jax.data.pipeline import rl_dataset
    from grouprank_jax.metrics_log import MetricsLogger
    from grouprank_jax.preemption import PreemptionGuard
    from grouprank_jax.sampling import Sampler, SamplingParams
    from grouprank_jax.sft.trainer import _progress
    from grouprank_jax.tokenizer import load_tokenizer

    grpo, run_dir = cfg.grpo, RunDir(Path(cfg.run_dir))
    G = grpo.rollouts_per_prompt
    if jax.process_count() > 1 and mesh is None:
        raise ValueError("multi-process GRPO needs the global mesh (mesh=...)")
    if grpo.global_batch_prompts % jax.process_count():
        raise ValueError(f"grpo.global_batch_prompts={grpo.global_batch_prompts} does not split over "
                         f"{jax.process_count()} processes")
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        for what, prompts in (("global_batch_prompts", grpo.global_batch_prompts), ("mini_batch_prompts", grpo.mini_batch_prompts)):
            if (prompts * G) % shards:
                raise ValueError(f"grpo.{what} x rollouts_per_prompt = {prompts} x {G} rollouts do not split over the "
                                 f"mesh's batch axes (data x fsdp = {shards}); make it a multiple of {shards}")
    tokenizer = tokenizer or load_tokenizer()
    preset = prompt_preset or cfg.sft.prompt_preset
    records = load_stage_records(records, cfg.data.rl_train, "rl", "rl_train")
    if model is None:
        model = load_initial_model(cfg.init_from, cfg.model, mesh, seed=cfg.seed)
    lora = grpo.lora_enabled
    if lora:
        model = rebuild_with_config(model, model.cfg.replace(
            lora_rank=grpo.lora_rank, lora_alpha=grpo.lora_alpha, lora_targets=tuple(grpo.lora_targets)), mesh, cfg.seed)
    save_base_weights(model, run_dir)

    prompts_per_process = grpo.global_batch_prompts // jax.process_count()
    steps_per_epoch = max(1, len(records) // grpo.global_batch_prompts)
    total_steps = grpo.epochs * steps_per_epoch if max_steps is None else max_steps
    updates_per_step = grpo.updates_per_rollout_batch
    tx = make_grpo_optimizer(grpo, total_steps * updates_per_step)
    state = init_train_state(model, tx, lora=lora, seed=cfg.seed)
    # Full fine-tuning keeps a frozen copy of the starting weights as the KL reference.
    ref_trainable = None
    if grpo.kl_coef and not lora:
        ref_trainable = jax.tree.map(jnp.copy, state.trainable)

    data_iter = iter(rl_dataset(list(records), batch_size=prompts_per_process, seed=cfg.seed))
    ckpt = Checkpointer(run_dir.checkpoints, save_every=cfg.checkpoint.save_every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    if ckpt.latest_step() is not None:
        state = apply_restored(state, ckpt.restore(target=restore_target(state), data_iterator=data_iter).state)
        log.info("resumed GRPO from step %d", state.step)

    # The sampler runs while the optimizer state (and a full-FT KL reference) stays on the chips:
    # on TPU, XLA is told so (the same options `grouprank compile` uses for it).
    resident = per_chip_bytes((state.opt_state, ref_trainable))
    sampler = Sampler(state.model, tokenizer=tokenizer, mesh=mesh, max_prompt_len=grpo.max_prompt_len,
                      max_new_tokens=grpo.max_response_len,
                      compiler_options={**cfg.xla_options, **tpu_reserved_hbm_options(mesh, resident)})
    kwargs = loss_kwargs(grpo)
    updates: dict[int, Any] = {}
    ref_fns: dict[int, Any] = {}
    logger = MetricsLogger(run_dir.root)
    history: list[dict] = []
    bar = _progress(progress, total_steps, state.step, "grpo")
    try:
        with PreemptionGuard() as guard:
            while state.step < total_steps:
                t0 = time.perf_counter()
                batch_records = next(data_iter)
                first_row = jax.process_index() * prompts_per_process  # global index of this process's first prompt
                # One stream per (step, global prompt): the group drawn for a prompt does not
                # depend on which process holds it.
                groups = [sample_group(r, grpo.group_size_range(state.step),
                                       random.Random(f"{cfg.seed}:{state.step}:{first_row + i}"))
                          for i, r in enumerate(batch_records)]
                prompts = build_prompts(tokenizer, groups, preset, cfg.sft.max_doc_chars, grpo.max_prompt_len)
                sampler.model = state.model  # the freshly updated arrays, no copy
                out = sampler.generate(prompts, SamplingParams(
                    temperature=grpo.temperature, n=G, seed=cfg.seed * 7919 + state.step,
                    max_new_tokens=grpo.max_response_len, stop=(STOP_STRING,)))
                t_sample = time.perf_counter() - t0
                scored = score_rollouts(out.texts, groups, G, cfg.reward, pad_to=grpo.group_size_max)
                advantages = np.asarray(group_advantages(
                    jnp.asarray(scored["reward"]), grpo.advantage, group_size=G, eps=grpo.adv_eps, ddof=grpo.adv_std_ddof))
                P, rows = _assemble_rows(tokenizer, prompts, out, G, sampler.pad_id, sampler.buckets, grpo.max_response_len)
                rows["advantages"] = advantages.astype(np.float32)
                device_rows = shard_batch(rows, mesh)
                if grpo.kl_coef:
                    if P not in ref_fns:
                        ref_fns[P] = make_logprob_fn(state.graphdef, P, cfg.sft.loss_chunk_size, use_lora=False,
                                                     micro_rows=grpo.micro_batch_rows, compiler_options=cfg.xla_options)
                    ref_weights = state.trainable if lora else ref_trainable
                    device_rows["ref_logp"] = ref_fns[P](ref_weights, state.frozen, device_rows["seq_ids"], device_rows["seq_mask"])
                if P not in updates:
                    updates[P] = make_grpo_update(state.graphdef, tx, kwargs, P, cfg.sft.loss_chunk_size,
                                                  micro_rows=grpo.micro_batch_rows, compiler_options=cfg.xla_options)
                step_metrics = _run_updates(updates[P], state, device_rows, grpo, G)
                state = step_metrics.pop("_state")
                state = dataclasses.replace(state, step=state.step + 1)
                dt = time.perf_counter() - t0
                train_tokens = float(rows["seq_mask"].sum()) * updates_per_step
                metrics = _step_metrics(scored, out, step_metrics, dt, t_sample, global_sum(train_tokens))
                logger.log(state.step, metrics)
                history.append({"step": state.step, **metrics})
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['grpo/reward_mean']:.3f}")
                stopping = guard.should_stop or state.step == stop_after
                ckpt.save(state.step, state.checkpoint_tree(), data_iterator=data_iter,
                          force=stopping or state.step == total_steps)
                if stopping:
                    log.warning("stopping at step %d; checkpoint saved", state.step)
                    break
    finally:
        bar.close()
        ckpt.close()
        logger.close()
    return GRPOResult(model=state.model, step=state.step, metrics=history, run_dir=run_dir.root)


def mini_batch_rows(num_prompts: int, rollouts: int, num_minis: int) -> list[np.ndarray]:
    """Row indices of each mini-batch: mini-batch j holds global prompts j, j + M, j + 2M, ...
    (all G rollouts of each). Strided rather than contiguous so that every process, which holds a
    contiguous block of prompts, contributes equally to every mini-batch, and the composition
    does not depend on the process count."""
    return [np.concatenate([np.arange(i * rollouts, (i + 1) * rollouts) for i in range(j, num_prompts, num_minis)])
            for j in range(num_minis)]


def _rows_like(array, idx: np.ndarray):
    """``array[idx]`` kept on ``array``'s batch sharding when the rows divide it (a global gather
    on multi-process runs; every process runs it alike)."""
    rows = array[idx]
    try:
        array.sharding.shard_shape(rows.shape)
    except ValueError:
        return rows  # rows do not divide the batch axes: let the update's jit place them
    return jax.device_put(rows, array.sharding)


def _run_updates(update_fn, state, rows: dict, grpo, G: int) -> dict:
    """num_updates_per_batch passes over the rollout batch in prompt-aligned mini-batches."""
    total_rows = rows["seq_ids"].shape[0]
    num_minis = max(1, total_rows // (grpo.mini_batch_prompts * G))
    if num_minis == 1:
        minis = [rows]
    else:
        minis = [{k: _rows_like(v, idx) for k, v in rows.items()} for idx in mini_batch_rows(total_rows // G, G, num_minis)]
    collected: list[dict] = []
    trainable, opt_state = state.trainable, state.opt_state
    for _ in range(grpo.num_updates_per_batch):
        for mb in minis:
            trainable, opt_state, metrics = update_fn(trainable, state.frozen, opt_state, mb)
            collected.append(jax.device_get(metrics))
    first = collected[0]
    out = {k: float(np.mean([m[k] for m in collected])) for k in first}
    out["logprob_drift"] = float(first["logprob_drift"])  # first update: sampler vs trainer
    out["first_ratio_mean"] = float(first["ratio_mean"])
    out["_state"] = dataclasses.replace(state, trainable=trainable, opt_state=opt_state)
    return out


def _step_metrics(scored: dict, out, update: dict, step_time: float, sample_time: float, train_tokens: float) -> dict:
    """Step metrics over every process's rollouts (per-rollout values are gathered first, so a
    std is the global std, not a mean of per-process stds)."""
    keys = ("reward", "ndcg", "recall", "alignment")
    gathered = {k: gather_rows(np.asarray(scored[k], np.float32)) for k in keys}
    valid = gather_rows((np.asarray(scored["format_status"]) == 0).astype(np.float32))
    lengths = gather_rows(np.asarray(out.lengths, np.float32))
    sample_time = float(gather_rows(np.asarray([sample_time], np.float32)).max())  # the slowest process
    reward = gathered["reward"]
    metrics = {
        "grpo/reward_mean": float(reward.mean()),
        "grpo/reward_std": float(reward.std()),
        "grpo/format_valid_rate": float(valid.mean()),
        "grpo/rollout_ndcg@10": float(gathered["ndcg"].mean()),
        "grpo/rollout_recall@10": float(gathered["recall"].mean()),
        "grpo/alignment": float(gathered["alignment"].mean()),
        "grpo/response_len_mean": float(lengths.mean()),
        "grpo/sampling_tokens_per_s": float(lengths.sum()) / max(sample_time, 1e-9),
        "grpo/training_tokens_per_s": train_tokens / max(step_time - sample_time, 1e-9),
        "grpo/step_time_s": step_time,
    }
    for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "logprob_drift", "first_ratio_mean"):
        if key in update:
            metrics[f"grpo/{key}"] = update[key]
    return metrics
