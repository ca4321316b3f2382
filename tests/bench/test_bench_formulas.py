"""The derived numbers benchmarks print: bytes a decode step must read, the roofline's measured
denominator reaching the device suite, FLOPs of the GRPO update."""

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
    {"result": ...} wrapper. Test doubles: the heavy sections are stubbed, the measurement fixed."""
    got = []
    monkeypatch.setattr(bench_sampling, "read_bandwidth", lambda megabytes: 1.234e12)
    monkeypatch.setattr(device_suite, "sampling", lambda *a: got.append(a[-1]) or [])
    monkeypatch.setattr(device_suite, "attention_24k", lambda *a: {})
    monkeypatch.setattr(device_suite, "train", lambda *a: {})
    assert device_suite.main(["--out", str(tmp_path / "suite.json"), "--smoke"]) == 0
    assert got == [1.234e12, 1.234e12]


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
