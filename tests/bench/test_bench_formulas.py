"""The derived numbers benchmarks print: bytes a decode step must read, the roofline's measured
denominator reaching the device suite, FLOPs of the GRPO update."""

import json

from grouprank_jax.bench import device_suite
from grouprank_jax.bench import sampling as bench_sampling
from grouprank_jax.config import model_preset

# The README's shared-prefix shape: 8 layers, 4 KV heads of 64, fp32, prompt 2,048 + 128 new.
SHAPE = dict(num_layers=8, hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=1024)


def test_decode_bytes_per_step_counts_what_each_layout_reads():
    tied = model_preset("tiny", dtype="float32", param_dtype="float32", tie_word_embeddings=True, **SHAPE)
    kv_slot = 2 * 8 * 4 * 64 * 4  # K and V, all layers, one token's slot, fp32
    shared = bench_sampling.decode_bytes_per_step(tied, 0, 2, 8, 2048, 128, shared=True)
    per_row = bench_sampling.decode_bytes_per_step(tied, 0, 2, 8, 2048, 128, shared=False)
    assert shared == kv_slot * (2 * 2048 + 16 * 128)  # each prompt once + every row's suffix buffer
    assert per_row == kv_slot * 16 * (2048 + 128)  # every row's own prompt copy + suffix
    # An untied input embedding is only gathered from: not read whole each step.
    untied = tied.replace(tie_word_embeddings=False)
    table = untied.vocab_size * untied.hidden_size * 4
    assert bench_sampling.decode_bytes_per_step(untied, table + 1000, 1, 1, 1, 1, True) == 1000 + kv_slot * 2


def test_the_device_suite_divides_by_the_bandwidth_it_measured(tmp_path, monkeypatch):
    """The sampling sections got a hard-wired 4.3 TB/s: the lookup missed the stored section's
    {"result": ...} wrapper. Test doubles: the heavy sections are stubbed, the measurement fixed;
    ``--sections`` runs only the sections named."""
    got = []
    monkeypatch.setattr(bench_sampling, "read_bandwidth", lambda megabytes: 1.234e12)
    monkeypatch.setattr(device_suite, "sampling", lambda *a: got.append(a[-1]) or [])
    monkeypatch.setattr(device_suite, "shared_prefix_long", lambda *a: got.append(a[-1]) or [])
    sections = ["bandwidth", "shared_prefix_7b_24k", "sampling_1.5b", "sampling_7b"]
    out = tmp_path / "suite.json"
    assert device_suite.main(["--out", str(out), "--smoke", "--sections", ",".join(sections)]) == 0
    assert got == [1.234e12] * 3
    assert sorted(json.loads(out.read_text())["sections"]) == sorted(sections)


def test_the_device_suites_shared_prefix_sections_run_at_smoke_size(tmp_path):
    """What a lent GPU would run for issue 14, on CPU at tiny shapes, so that no device time is
    lost to a crash: shared-prefix decode (both layouts token-identical in fp32 here) and the
    GRPO update in both layouts (losses agree)."""
    out = tmp_path / "suite.json"
    sections = "bandwidth,shared_prefix_7b_24k,grpo_update_1.5b_lora"
    assert device_suite.main(["--out", str(out), "--smoke", "--sections", sections]) == 0
    results = {k: v["result"] for k, v in json.loads(out.read_text())["sections"].items()}
    shared, separate = results["shared_prefix_7b_24k"]
    assert (shared["n"], separate["prompts"]) == (8, 8) and shared["tokens_identical"]
    assert shared["rows_identical_within_layout"] and separate["rows_identical_within_layout"]
    assert shared["bandwidth_fraction"] > 0 and separate["step_read_gb"] > shared["step_read_gb"]
    update = {r["layout"]: r for r in results["grpo_update_1.5b_lora"]}
    assert update["shared"]["tokens_computed"] < update["per_rollout"]["tokens_computed"]
    assert update["shared"]["loss_rel_diff"] < 2e-2 and update["shared"]["lora_rank"] == 32


def test_grpo_update_flops_charge_the_lm_head_on_completions_only():
    """Both GRPO layouts run the LM head on the completion positions alone: the difference
    between the layouts is the trunk's, and the head's share is d x V x completions."""
    from grouprank_jax.preflight.flops import matmul_params, shared_prefix_training_flops, training_flops

    cfg = model_preset("tiny", **SHAPE)
    B, G, P, C = 2, 8, 1024, 64
    head, trunk = cfg.hidden_size * cfg.vocab_size, matmul_params(cfg) - cfg.hidden_size * cfg.vocab_size
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    per_rollout = training_flops(cfg, B * G, P + C, head_tokens=B * G * C)
    assert per_rollout == 6 * (trunk * B * G * (P + C) + head * B * G * C) + attention * B * G * (P + C) ** 2 / 2
    shared = shared_prefix_training_flops(cfg, B, G, P, C, head_tokens=B * G * C)
    pairs = B * (P * P / 2 + G * (C * P + C * C / 2))
    assert shared == 6 * (trunk * B * (P + G * C) + head * B * G * C) + attention * pairs
    assert training_flops(cfg, 4, 32) == 6 * matmul_params(cfg) * 4 * 32 + attention * 4 * 32 * 32 / 2  # default: all
