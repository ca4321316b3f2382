"""``grouprank demo``: the whole pipeline on two CPU cores in minutes.

A tiny Qwen2 (random init, the real Qwen2.5 tokenizer) learns the bundled toy ranking task:
SFT until the output format and the relevance judgement are learned, GRPO with the GroupRank reward,
then reranking of a held-out split scored by NDCG@10 for the random-init, SFT and GRPO models,
and finally an HF export reloaded by transformers. Every number printed is measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grouprank_jax.config import ModelConfig, model_preset
from grouprank_jax.config.run import CheckpointConfig, PromptConfig, RunConfig
from grouprank_jax.data.formats import read_beir_corpus, read_beir_queries, read_qrels, read_run
from grouprank_jax.data.records import iter_records
from grouprank_jax.demo.data import DemoDataConfig, write_demo_data
from grouprank_jax.eval import evaluate
from grouprank_jax.models import create_model
from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.rl.trainer import train_grpo
from grouprank_jax.sampling import Sampler
from grouprank_jax.sft.config import SFTConfig
from grouprank_jax.sft.trainer import train_sft
from grouprank_jax.task.prompts import load_template, render_prompt
from grouprank_jax.task.rerank import Candidate, RerankConfig, rerank
from grouprank_jax.task.scoring import ScoringCounters, sampler_score_fn
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.weights import save_hf

log = logging.getLogger(__name__)

# 64 wide, 4 layers; RoPE theta 1e4 instead of Qwen2.5's 1e6: with 16-dim heads, theta 1e6
# leaves almost no positional resolution at the demo's ~150-token prompts. Init std 0.1 (about
# 1/sqrt(64)) instead of HF's 0.02: at 0.02 a 64-wide model's attention logits start near zero
# and even copying one token from a fixed earlier position was not learned in 300 steps (ours
# and transformers' PyTorch Qwen2 alike); at 0.1 it is learned in ~250.
DEMO_MODEL = model_preset(
    "tiny",
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    rope_theta=10_000.0,
    initializer_range=0.1,
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = DEMO_MODEL
    data: DemoDataConfig = DemoDataConfig()
    sft_steps: int = 500
    sft_batch: int = 8
    sft_learning_rate: float = 3e-3
    sft_min_lr_ratio: float = 0.3  # relevance emerges late (~400 steps): keep the learning rate up
    grpo_steps: int = 16
    # 6 prompts x 8 rollouts: 48 rollouts per step average out enough sampling noise for the
    # reward to rise within 16 steps (4 x 4 at lr 5e-4 gave no measurable trend; 8 x 8 at 2e-3
    # lost format-validity). The LR is constant (GRPOConfig.lr_schedule, verl's default): with
    # a cosine decay the later steps barely moved (CI-like 8-device run: +0.033 vs +0.059).
    grpo_prompts: int = 6  # prompts per GRPO step
    grpo_rollouts: int = 8  # G
    grpo_learning_rate: float = 1e-3
    grpo_temperature: float = 1.0  # the paper's rollout temperature; the SFT model keeps its format at 1.0
    grpo_lora_rank: int = 16
    grpo_lora_alpha: float = 32.0
    grpo_window: int = 4  # steps averaged for "first" vs "last" reward
    max_new_tokens: int = 80
    eval_group_size: int = 4
    prompt_preset: str = "demo"
    # Sampled (T=1) held-out evaluations, each with its own grouping and sampling seed, averaged:
    # one pass over 8 held-out queries has a std of ~0.05-0.06 NDCG@10 (measured over 10 seeds).
    sampled_eval_seeds: int = 4


PRESETS = {
    "default": DemoConfig(),
    # The CI configuration: the same SFT (relevance emerges only after ~400 steps) and GRPO (the
    # reward trend needs its 16 steps), a smaller held-out set.
    "ci": DemoConfig(data=DemoDataConfig(eval_queries=8), sampled_eval_seeds=8),
}


def _eval_reranker(
    model, tokenizer, data_paths: dict, cfg: DemoConfig, max_prompt_len: int, temperature: float = 0.0, sampler=None
):

    corpus = read_beir_corpus(data_paths["corpus"])
    queries = read_beir_queries(data_paths["queries"])
    first_stage = read_run(data_paths["run"])
    qrels = read_qrels(data_paths["qrels"])
    candidates = {qid: [Candidate(d, corpus[d], s) for d, s in docs.items()] for qid, docs in first_stage.items()}
    template = load_template(cfg.prompt_preset)
    counters = ScoringCounters()
    score_fn = sampler_score_fn(
        model,
        tokenizer,
        max_prompt_len=max_prompt_len,
        max_new_tokens=cfg.max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        seed=cfg.seed,
        counters=counters,
        sampler=sampler,
    )
    run, summary = rerank(
        queries,
        candidates,
        score_fn,
        lambda q, docs: render_prompt(tokenizer, q, docs, template, max_prompt_len=max_prompt_len),
        RerankConfig(top_n=cfg.data.eval_candidates, group_size=cfg.eval_group_size, batch_size=32, seed=cfg.seed),
    )
    ndcg = evaluate(run, qrels, ("ndcg_cut_10",)).mean["ndcg_cut_10"]
    first = evaluate(first_stage, qrels, ("ndcg_cut_10",)).mean["ndcg_cut_10"]
    return {
        "ndcg@10": ndcg,
        "first_stage_ndcg@10": first,
        "groups": summary.groups,
        "parse_failures": summary.parse_failures,
        "seconds": summary.seconds,
        "generated_tokens": counters.generated_tokens,
    }


def _export_and_reload(model, tokenizer, out_dir: Path) -> dict:
    """Export to HF (LoRA merged), reload with transformers, compare logits on a real prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    save_hf(model, out_dir, tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    ids = np.asarray([tokenizer.encode("Query: apple\n\nDocuments:\n[1]. apple warm red", add_special_tokens=False)])
    ours = np.asarray(model(ids))
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    return {"hf_dir": str(out_dir), "max_abs_logit_diff": float(np.abs(ours - theirs).max())}


def _plot(sft_metrics: list[dict], grpo_metrics: list[dict], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("SFT loss", sft_metrics, "sft/loss"),
        ("GRPO reward (mean)", grpo_metrics, "grpo/reward_mean"),
        ("GRPO format-valid rate", grpo_metrics, "grpo/format_valid_rate"),
        ("GRPO rollout NDCG@10", grpo_metrics, "grpo/rollout_ndcg@10"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (title, rows, key) in zip(axes, panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _copy_model(model):

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict:

    started = time.perf_counter()
    root = Path(cfg.run_dir)
    if root.exists():
        shutil.rmtree(root)  # the demo always starts from scratch (training runs resume instead)
    paths = write_demo_data(root / "data", cfg.data)
    tokenizer = load_tokenizer()
    max_prompt_len = 128
    random_model = create_model(cfg.model, seed=cfg.seed)
    # Training donates its input buffers: SFT gets its own copy so the random-init model stays
    # alive for the evaluation.
    sft_init = _copy_model(random_model)
    checkpoint = CheckpointConfig(save_every=10_000, keep=1)
    timings = {}

    t0 = time.perf_counter()
    sft_cfg = RunConfig(
        # one LM-head block per step (~600 loss tokens): no remat, 0.64 vs 1.03 s/step
        model=cfg.model.replace(loss_chunk_size=1024),
        run_dir=str(root / "sft"),
        seed=cfg.seed,
        checkpoint=checkpoint,
        prompt=PromptConfig(preset=cfg.prompt_preset),
        sft=SFTConfig(
            learning_rate=cfg.sft_learning_rate,
            per_device_batch=cfg.sft_batch,
            grad_accum_steps=1,
            max_seq_len=160,
            length_buckets=(160,),
            packing=False,
            warmup_ratio=0.05,
            weight_decay=0.0,
            total_steps=cfg.sft_steps,
            min_lr_ratio=cfg.sft_min_lr_ratio,
        ),
    )
    sft = train_sft(
        sft_cfg,
        records=list(iter_records([str(paths["sft_train"])], purpose="sft")),
        tokenizer=tokenizer,
        model=sft_init,
        progress=progress,
    )
    timings["sft_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grpo_cfg = RunConfig(
        model=sft_cfg.model,
        run_dir=str(root / "grpo"),
        seed=cfg.seed,
        checkpoint=checkpoint,
        prompt=sft_cfg.prompt,
        grpo=GRPOConfig(
            rollouts_per_prompt=cfg.grpo_rollouts,
            global_batch_prompts=cfg.grpo_prompts,
            mini_batch_prompts=cfg.grpo_prompts,
            learning_rate=cfg.grpo_learning_rate,
            temperature=cfg.grpo_temperature,
            max_prompt_len=max_prompt_len,
            max_response_len=cfg.max_new_tokens,
            # The demo's few bundled records repeat every epoch: redraw reshuffles each one's
            # document order per step, so the tiny model cannot learn answer positions.
            group_sampling="redraw",
            group_size_min=cfg.data.min_group,
            group_size_max=cfg.data.max_group,
            lora_rank=cfg.grpo_lora_rank,
            lora_alpha=cfg.grpo_lora_alpha,
            total_steps=cfg.grpo_steps,
        ),
    )
    grpo = train_grpo(
        grpo_cfg,
        records=list(iter_records([str(paths["rl_train"])], purpose="rl")),
        tokenizer=tokenizer,
        model=_copy_model(sft.model),
        progress=progress,
    )
    timings["grpo_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = (("random-init", random_model), ("sft", sft.model), ("grpo", grpo.model))
    # One Sampler per model for all of its passes: the seeds are traced, so the sampled passes
    # after the first compile nothing (a Sampler per pass compiled 24 decode programs here).
    samplers = {
        name: Sampler(m, tokenizer=tokenizer, max_prompt_len=max_prompt_len, max_new_tokens=cfg.max_new_tokens)
        for name, m in models
    }
    evals = {
        name: _eval_reranker(m, tokenizer, paths, cfg, max_prompt_len, sampler=samplers[name]) for name, m in models
    }
    # Also at the rollout temperature: greedy decoding takes the mode of each score, which the
    # noisy teacher already had right, so GRPO's calibration shows mostly in sampled decoding.
    sampled = {
        name: [
            _eval_reranker(
                m,
                tokenizer,
                paths,
                dataclasses.replace(cfg, seed=cfg.seed + i),
                max_prompt_len,
                temperature=cfg.grpo_temperature,
                sampler=samplers[name],
            )["ndcg@10"]
            # the random-init model's groups never parse (its order is the first stage's): one seed
            for i in range(cfg.sampled_eval_seeds if name != "random-init" else 1)
        ]
        for name, m in models
    }
    timings["eval_s"] = time.perf_counter() - t0
    export = _export_and_reload(grpo.model, tokenizer, root / "hf")

    rewards = [m["grpo/reward_mean"] for m in grpo.metrics]
    w = min(cfg.grpo_window, max(1, len(rewards) // 2))
    summary = {
        "ndcg@10": {
            "first-stage (random order)": evals["sft"]["first_stage_ndcg@10"],
            **{k: v["ndcg@10"] for k, v in evals.items()},
        },
        "ndcg@10_sampled": {k: float(np.mean(v)) for k, v in sampled.items()},
        "ndcg@10_sampled_std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in sampled.items()},
        "ndcg@10_sampled_per_seed": sampled,
        "sampling_temperature": cfg.grpo_temperature,
        "parse_failures": {k: f"{v['parse_failures']}/{v['groups']}" for k, v in evals.items()},
        "sft_loss_first_last": [sft.metrics[0]["sft/loss"], sft.metrics[-1]["sft/loss"]],
        "grpo_reward_first_last": [float(np.mean(rewards[:w])), float(np.mean(rewards[-w:]))],
        "grpo_format_valid_first_last": [
            float(np.mean([m["grpo/format_valid_rate"] for m in grpo.metrics[:w]])),
            float(np.mean([m["grpo/format_valid_rate"] for m in grpo.metrics[-w:]])),
        ],
        "export": export,
        "timings_s": {**timings, "total_s": time.perf_counter() - started},
        "curves_png": str(_plot(sft.metrics, grpo.metrics, root / "curves.png")),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    lines = ["", "GroupRank demo (tiny Qwen2, real Qwen2.5 tokenizer, bundled toy data)", ""]
    t_sampled = summary["sampling_temperature"]
    seeds = max(len(v) for v in summary["ndcg@10_sampled_per_seed"].values())
    lines.append(
        f"| model | held-out NDCG@10 (greedy) | held-out NDCG@10 (sampled, T={t_sampled:g}, mean ± std of "
        f"{seeds} seeds) | unparsable groups (greedy) |"
    )
    lines.append("|---|---|---|---|")
    for name, value in summary["ndcg@10"].items():
        s, sd = summary["ndcg@10_sampled"].get(name), summary["ndcg@10_sampled_std"].get(name)
        lines.append(
            f"| {name} | {value:.4f} | {'-' if s is None else f'{s:.4f} ± {sd:.4f}'} | "
            f"{summary['parse_failures'].get(name, '-')} |"
        )
    first, last = summary["grpo_reward_first_last"]
    f_first, f_last = summary["grpo_format_valid_first_last"]
    s_first, s_last = summary["sft_loss_first_last"]
    t = summary["timings_s"]
    lines += [
        "",
        f"SFT loss: {s_first:.3f} -> {s_last:.3f}",
        f"GRPO mean reward, first vs last steps: {first:.4f} -> {last:.4f}",
        f"GRPO format-valid rate, first vs last steps: {f_first:.3f} -> {f_last:.3f}",
        f"HF export: {summary['export']['hf_dir']} reloaded by transformers, "
        f"max |logit diff| = {summary['export']['max_abs_logit_diff']:.2e}",
        f"time: SFT {t['sft_s']:.0f}s, GRPO {t['grpo_s']:.0f}s, eval {t['eval_s']:.0f}s, total {t['total_s']:.0f}s",
        f"curves: {summary['curves_png']}",
    ]
    return "\n".join(lines)
