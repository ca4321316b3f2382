"""The GRPO stage (paper §3.3 / Table 10): per step, B prompts -> G rollouts each from the
shared-weight sampler -> parse -> jitted reward -> group advantages -> policy update(s), run by
the one training loop (``training/loop.py``).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grouprank_jax.config.run import RunConfig
from grouprank_jax.config.yaml_io import to_dict
from grouprank_jax.data.pipeline import rl_dataset
from grouprank_jax.parallel.distributed import gather_rows, global_sum
from grouprank_jax.parallel.mesh import per_chip_bytes, tpu_reserved_hbm_options
from grouprank_jax.rl.advantages import group_advantages
from grouprank_jax.rl.losses import loss_kwargs
from grouprank_jax.rl.rollout import (
    STOP_STRING,
    assemble_rows,
    build_prompts,
    check_group_sizes,
    check_prompt_budget,
    record_group,
    sample_group,
    score_rollouts,
)
from grouprank_jax.rl.step import make_grpo_optimizer, make_grpo_update, make_logprob_fn
from grouprank_jax.sampling import Sampler, SamplingParams
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.training.loop import TrainResult, train_loop
from grouprank_jax.training.run_dir import RunDir, save_base_weights, stage_records
from grouprank_jax.training.state import init_train_state, shard_batch
from grouprank_jax.weights.loading import initial_model, merge_lora, resumed_base, with_lora

log = logging.getLogger(__name__)


def _check_batch_split(grpo, mesh) -> None:
    G = grpo.rollouts_per_prompt
    if jax.process_count() > 1 and mesh is None:
        raise ValueError("multi-process GRPO needs the global mesh (mesh=...)")
    if grpo.global_batch_prompts % jax.process_count():
        raise ValueError(
            f"grpo.global_batch_prompts={grpo.global_batch_prompts} does not split over {jax.process_count()} processes"
        )
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if replicated := grpo.replicated_prompts_warning(shards):
            log.warning(replicated)
        for what, prompts in (
            ("global_batch_prompts", grpo.global_batch_prompts),
            ("mini_batch_prompts", grpo.mini_batch_prompts),
        ):
            if (prompts * G) % shards:
                raise ValueError(
                    f"grpo.{what} x rollouts_per_prompt = {prompts} x {G} rollouts do not split over "
                    f"the mesh's batch axes (data x fsdp = {shards}); make it a multiple of {shards}"
                )


def train_grpo(
    cfg: RunConfig,
    records: Sequence[Mapping[str, Any]] | None = None,
    tokenizer=None,
    mesh=None,
    model=None,
    max_steps: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run (or resume) GRPO in ``cfg.run_dir``; a ``model`` passed in is consumed (donated)."""
    grpo, run_dir = cfg.grpo, RunDir(Path(cfg.run_dir))
    G = grpo.rollouts_per_prompt
    _check_batch_split(grpo, mesh)
    tokenizer = tokenizer or load_tokenizer()
    records = stage_records(records, cfg.data.rl_train, "rl", "rl_train")
    if grpo.group_sampling == "as_written":
        check_group_sizes(records, grpo.group_size_max)
    # loads the template too: a bad preset or an over-long record fails here, not after the model is built
    check_prompt_budget(records, tokenizer, cfg.prompt.preset, grpo.max_prompt_len, grpo.group_size_max)
    lora = grpo.lora_enabled
    # The starting weights are kept in the run dir when they are the frozen LoRA base or the
    # full fine-tuning KL reference: a resume must not re-read a changed init_from.
    keep_base = lora or bool(grpo.kl_coef)
    if model is None:
        resumed = resumed_base(run_dir.root, cfg.model, mesh) if keep_base else None
        model = resumed or initial_model(cfg.init_from, cfg.model, mesh, seed=cfg.seed)
    elif model.cfg.lora_rank:  # a LoRA-trained model passed in starts merged, as it would from init_from
        model = merge_lora(model, mesh)
    if lora:
        model = with_lora(model, grpo.lora_rank, grpo.lora_alpha, grpo.lora_targets, mesh, cfg.seed)
    save_base_weights(model, run_dir, keep_base=keep_base)

    prompts_per_process = grpo.global_batch_prompts // jax.process_count()
    total_steps = grpo_total_steps(grpo, len(records), max_steps)
    tx = make_grpo_optimizer(grpo, total_steps * grpo.updates_per_rollout_batch)
    state = init_train_state(model, tx, lora=lora, seed=cfg.seed)
    # Full fine-tuning keeps a frozen copy of the starting weights as the KL reference.
    ref_trainable = jax.tree.map(jnp.copy, state.trainable) if grpo.kl_coef and not lora else None
    data_iter = iter(rl_dataset(list(records), batch_size=prompts_per_process, seed=cfg.seed))
    # The sampler runs while the optimizer state (and a full-FT KL reference) stays on the chips:
    # on TPU, XLA is told so (the same options `grouprank compile` uses for it).
    resident = per_chip_bytes((state.opt_state, ref_trainable))
    sampler = Sampler(
        state.model,
        tokenizer=tokenizer,
        mesh=mesh,
        max_prompt_len=grpo.max_prompt_len,
        max_new_tokens=grpo.max_response_len,
        compiler_options={**cfg.xla_options, **tpu_reserved_hbm_options(mesh, resident)},
        shared_prefix=grpo.shared_prefix_sampling,
    )
    chunk = cfg.model.loss_chunk_size
    updates: dict[int, Any] = {}  # by prompt bucket P: one compiled update / reference fn per shape
    ref_fns: dict[int, Any] = {}

    def grpo_step(state, batch_records):
        t0 = time.perf_counter()
        first_row = jax.process_index() * prompts_per_process  # global index of this process's first prompt
        # One stream per (step, global prompt): the group drawn for a prompt does not depend on
        # which process holds it.
        if grpo.group_sampling == "as_written":
            groups = [record_group(r) for r in batch_records]
        else:
            groups = [
                sample_group(
                    r, grpo.group_size_range(state.step), random.Random(f"{cfg.seed}:{state.step}:{first_row + i}")
                )
                for i, r in enumerate(batch_records)
            ]
        prompts = build_prompts(tokenizer, groups, cfg.prompt.preset, cfg.prompt.max_doc_chars, grpo.max_prompt_len)
        sampler.model = state.model  # the freshly updated arrays, no copy
        out = sampler.generate(
            prompts,
            SamplingParams(
                temperature=grpo.temperature,
                n=G,
                seed=cfg.seed * 7919 + state.step,
                max_new_tokens=grpo.max_response_len,
                stop=(STOP_STRING,),
                tempered_logprobs=True,  # old_logp at the sampling temperature, as the update's
            ),
        )
        t_sample = time.perf_counter() - t0
        scored = score_rollouts(out.texts, groups, G, cfg.reward, pad_to=grpo.group_size_max)
        advantages = np.asarray(
            group_advantages(
                jnp.asarray(scored["reward"]), grpo.advantage, group_size=G, eps=grpo.adv_eps, ddof=grpo.adv_std_ddof
            )
        )
        P, rows = assemble_rows(tokenizer, prompts, out, G, sampler.pad_id, sampler.buckets, grpo.max_response_len)
        rows["advantages"] = advantages.astype(np.float32)
        device_rows = shard_batch(rows, mesh)
        if grpo.kl_coef:
            if P not in ref_fns:
                ref_fns[P] = make_logprob_fn(
                    state.graphdef,
                    P,
                    chunk,
                    use_lora=False,
                    micro_rows=grpo.micro_batch_rows,
                    compiler_options=cfg.xla_options,
                    rollouts=G if grpo.shared_prefix else None,
                    temperature=grpo.temperature,
                )
            ref_weights = state.trainable if lora else ref_trainable
            device_rows["ref_logp"] = ref_fns[P](
                ref_weights, state.frozen, device_rows["seq_ids"], device_rows["seq_mask"]
            )
        if P not in updates:
            updates[P] = make_grpo_update(
                state.graphdef,
                tx,
                loss_kwargs(grpo),
                P,
                chunk,
                micro_rows=grpo.micro_batch_rows,
                compiler_options=cfg.xla_options,
                rollouts=G if grpo.shared_prefix else None,
                temperature=grpo.temperature,
            )
        state, update_metrics = _run_updates(updates[P], state, device_rows, grpo, G)
        computed = computed_tokens(rows["seq_mask"], P, G if grpo.shared_prefix else None)
        train_tokens = global_sum(float(computed) * grpo.updates_per_rollout_batch)
        step_time = time.perf_counter() - t0
        return state, _step_metrics(scored, out, update_metrics, step_time, t_sample, train_tokens, G)

    return train_loop(
        "grpo",
        state,
        data_iter,
        total_steps,
        grpo_step,
        run_dir=run_dir,
        checkpoint=cfg.checkpoint,
        stop_after=stop_after,
        progress=progress,
        config=to_dict(cfg),
        data_batch=prompts_per_process,
        postfix="reward_mean",
    )


def grpo_total_steps(grpo, num_records: int, max_steps: int | None = None) -> int:
    """``grpo.total_steps``, else ``epochs`` x the batches in the data; ``max_steps`` (the CLI's
    ``--max-steps``) caps it, as for SFT."""
    total = grpo.total_steps or grpo.epochs * max(1, num_records // grpo.global_batch_prompts)
    return total if max_steps is None else min(total, max_steps)


def computed_tokens(seq_mask: np.ndarray, prompt_len: int, rollouts: int | None) -> int:
    """Tokens one forward over the rows computes (``seq_mask [R, P+C]``, prompt-major rows):
    every row's prompt and response, or with the shared prefix (``rollouts=G``) each prompt once
    plus every response."""
    if not rollouts:
        return int(seq_mask.sum())
    return int(seq_mask[::rollouts, :prompt_len].sum() + seq_mask[:, prompt_len:].sum())


def mini_batch_rows(num_prompts: int, rollouts: int, num_minis: int) -> list[np.ndarray]:
    """Row indices of each mini-batch: mini-batch j holds global prompts j, j + M, j + 2M, ...
    (all G rollouts of each). Strided rather than contiguous so that every process, which holds a
    contiguous block of prompts, contributes equally to every mini-batch, and the composition
    does not depend on the process count."""
    return [
        np.concatenate([np.arange(i * rollouts, (i + 1) * rollouts) for i in range(j, num_prompts, num_minis)])
        for j in range(num_minis)
    ]


def _rows_like(array, idx: np.ndarray):
    """``array[idx]`` kept on ``array``'s batch sharding when the rows divide it (a global gather
    on multi-process runs; every process runs it alike)."""
    rows = array[idx]
    try:
        array.sharding.shard_shape(rows.shape)
    except ValueError:
        return rows  # rows do not divide the batch axes: let the update's jit place them
    return jax.device_put(rows, array.sharding)


def _run_updates(update_fn, state, rows: dict, grpo, G: int):
    """num_updates_per_batch passes over the rollout batch in prompt-aligned mini-batches."""
    total_rows = rows["seq_ids"].shape[0]
    num_minis = max(1, total_rows // (grpo.mini_batch_prompts * G))
    if num_minis == 1:
        minis = [rows]
    else:
        minis = [
            {k: _rows_like(v, idx) for k, v in rows.items()} for idx in mini_batch_rows(total_rows // G, G, num_minis)
        ]
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
    return dataclasses.replace(state, trainable=trainable, opt_state=opt_state), out


def _step_metrics(
    scored: dict, out, update: dict, step_time: float, sample_time: float, train_tokens: float, rollouts: int
) -> dict:
    """Step metrics over every process's rollouts (per-rollout values are gathered first, so a
    std is the global std, not a mean of per-process stds). Rows are prompt-major with a
    prompt's ``rollouts`` rows on one process, so the gathered rows regroup by prompt."""
    keys = ("reward", "ndcg", "recall", "alignment", "rewarded")
    gathered = {k: gather_rows(np.asarray(scored[k], np.float32)) for k in keys}
    # Ranking metrics average the rollouts that earned the group reward (a penalised answer's
    # NDCG or alignment is not what it was rewarded for); 0 when none did.
    rewarded = gathered["rewarded"]
    over_rewarded = lambda k: float((gathered[k] * rewarded).sum() / max(rewarded.sum(), 1.0))
    lengths = gather_rows(np.asarray(out.lengths, np.float32))
    sample_time = float(gather_rows(np.asarray([sample_time], np.float32)).max())  # the slowest process
    reward = gathered["reward"]
    metrics = {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()),
        # TRL's metric: groups whose G rewards are all equal have zero advantage (no signal)
        "frac_reward_zero_std": float(np.mean(np.isclose(reward.reshape(-1, rollouts).std(axis=1), 0.0))),
        "format_valid_rate": float(rewarded.mean()),  # tags, JSON and >= 1 scored document
        "rollout_ndcg@10": over_rewarded("ndcg"),
        "rollout_recall@10": over_rewarded("recall"),
        "alignment": over_rewarded("alignment"),
        "response_len_mean": float(lengths.mean()),
        "sampling_tokens_per_s": float(lengths.sum()) / max(sample_time, 1e-9),
        "training_tokens_per_s": train_tokens / max(step_time - sample_time, 1e-9),
    }
    for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "logprob_drift", "first_ratio_mean"):
        if key in update:
            metrics[key] = update[key]
    return metrics
