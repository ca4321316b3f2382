"""Helpers shared by tests that use HF transformers' PyTorch Qwen2 as the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_hf_model(
    out_dir: Path,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    inter=128,
    vocab=512,
    tied=False,
    seed=0,
    dtype="float32",
    bias_scale=0.1,
    weight_scale=1.0,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
):
    """A random-weight HF Qwen2ForCausalLM saved to ``out_dir`` (nonzero biases, so they are tested).

    ``weight_scale`` multiplies transformers' init (std 0.02) of every matrix: larger weights give
    larger logits and attention far from uniform, where a wrong q/k path shows."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        tie_word_embeddings=tied,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_scale)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(weight_scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """HF generation's position ids for a left-padded batch."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(hf_positions(mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths, vocab, total=None):
    total = total or max(lengths)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        ids[row, total - n :] = rng.integers(3, vocab, size=n)
        mask[row, total - n :] = 1
    return ids, mask
