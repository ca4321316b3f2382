"""The CI demo (``grouprank demo --preset ci``: the default with 8 held-out queries): SFT ->
GRPO -> rerank + eval -> HF export.

Asserts what the demo achieves on 2 CPU cores: SFT learns the output format (the trained
models' held-out groups parse, the random-init model's do not) and the relevance judgement (the
SFT and GRPO models' held-out NDCG@10 beats the random-init model's, which keeps the random
first-stage order); GRPO learns the calibration the noisy SFT teacher lacks
(grouprank_jax/demo/data.py): its sampled (T=1) held-out NDCG@10 beats SFT's by a margin of
several standard deviations of the evaluation noise, and its mean reward rises (last 4 steps vs
first 4) by more than the sampling noise; every stage runs, the
curves are written, and the exported model reloaded by transformers reproduces our logits.
"""

import dataclasses

import pytest

from grouprank_jax.demo.run import PRESETS, format_summary, run_demo


@pytest.mark.slow
def test_short_demo_learns_and_exports(tmp_path):
    cfg = dataclasses.replace(PRESETS["ci"], run_dir=str(tmp_path / "demo"))
    summary = run_demo(cfg, progress=False)
    print(format_summary(summary))
    failures = {k: int(v.split("/")[0]) / int(v.split("/")[1]) for k, v in summary["parse_failures"].items()}
    assert failures["random-init"] == 1.0
    assert failures["sft"] <= 0.1 and failures["grpo"] <= 0.1, summary["parse_failures"]
    s_first, s_last = summary["sft_loss_first_last"]
    assert s_last < 0.03 * s_first  # not ~0: the teacher's noisy score tokens keep their entropy
    ndcg = summary["ndcg@10"]
    assert ndcg["random-init"] == pytest.approx(ndcg["first-stage (random order)"])  # unparsable: order kept
    assert ndcg["sft"] > ndcg["random-init"] + 0.2, ndcg  # measured: see README
    assert ndcg["grpo"] > ndcg["random-init"] + 0.2, ndcg
    # What GRPO is there for: calibrated scores. Sampled (T=1) held-out NDCG@10, mean over 8
    # evaluation seeds, measured under the suite's conditions: SFT 0.510 (std over seeds 0.075),
    # GRPO 0.656 (0.039). The std of the difference of two 8-seed means is 0.030, so the margin of
    # 0.09 is 3 of them above zero, and the measured gap (0.146) is 1.9 of them above the margin.
    # Standalone on 2026-12-05, after the CPU head's softmax went per-row: SFT 0.530 (0.061), GRPO
    # 0.730 (0.029).
    sampled = summary["ndcg@10_sampled"]
    assert sampled["grpo"] - sampled["sft"] > 0.09, (sampled, summary["ndcg@10_sampled_std"])
    # The reward rises: last-4 vs first-4 step means, measured 1.097 -> 1.134 in the suite (1.088 ->
    # 1.187 in a standalone run, 1.090 -> 1.184 standalone on 2026-12-05); the sampling noise of
    # that difference is 0.029 (48 rollouts a step, per-step std ~0.29). This margin guards the
    # sign with some room; the calibration claim above is the one asserted several standard
    # deviations out.
    r_first, r_last = summary["grpo_reward_first_last"]
    assert r_last - r_first > 0.02, summary["grpo_reward_first_last"]
    assert summary["export"]["max_abs_logit_diff"] < 5e-5  # measured 9.5e-6 - 1.6e-5
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 0
