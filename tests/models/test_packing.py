"""Packing has an oracle independent of our mask code: a packed row (segment ids, positions
restarting per segment) gives each sequence the logits it gets when run alone, through our
model and through transformers' PyTorch Qwen2; and the SFT loss of a packed batch equals the
loss of the same sequences unpacked."""

import numpy as np
import pytest
from flax import nnx

from grouprank_jax.sft.step import sft_loss_sums
from grouprank_jax.weights import load_hf

from hf_utils import hf_logits, make_hf_model

LENGTHS = (5, 9, 7)
ROW = 24  # 21 real tokens + 3 padding


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_pack")
    model = make_hf_model(path, hidden=64, heads=4, kv_heads=2, inter=128, vocab=512)
    return path, model


def _sequences():
    rng = np.random.default_rng(3)
    return [rng.integers(3, 512, size=n) for n in LENGTHS]


def _packed(seqs):
    ids = np.zeros((1, ROW), np.int32)
    seg = np.zeros((1, ROW), np.int32)
    pos = np.zeros((1, ROW), np.int32)
    start = 0
    for s, x in enumerate(seqs, start=1):
        ids[0, start : start + len(x)] = x
        seg[0, start : start + len(x)] = s
        pos[0, start : start + len(x)] = np.arange(len(x))
        start += len(x)
    return ids, seg, pos


@pytest.mark.parametrize("impl", ["reference", "chunked", "splash"])
def test_packed_forward_equals_each_sequence_alone(hf_dir, impl):
    path, hf = hf_dir
    extra = {"splash_interpret": True} if impl == "splash" else {}
    model = load_hf(path, attention_impl=impl, attention_block_size=8, **extra)
    seqs = _sequences()
    ids, seg, pos = _packed(seqs)
    packed = np.asarray(model(ids, segment_ids=seg, positions=pos))[0]  # [ROW, V]
    start = 0
    for x in seqs:
        alone = np.asarray(model(x[None]))[0]
        theirs = hf_logits(hf, x[None], np.ones((1, len(x)), np.int64))[0]
        got = packed[start : start + len(x)]
        assert np.abs(got - alone).max() <= 1e-5, impl
        assert np.abs(got - theirs).max() <= 1e-5, impl
        start += len(x)


def test_sft_loss_packed_equals_unpacked(hf_dir):
    path, _ = hf_dir
    model = load_hf(path, attention_impl="chunked", attention_block_size=8)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    seqs = _sequences()
    rng = np.random.default_rng(4)
    targets_mask = [(rng.random(len(x)) < 0.6).astype(np.int32) for x in seqs]

    # packed: one row; the last token of each segment predicts nothing
    ids, seg, pos = _packed(seqs)
    targets = np.zeros_like(ids)
    loss_mask = np.zeros_like(ids)
    start = 0
    for x, m in zip(seqs, targets_mask):
        n = len(x)
        targets[0, start : start + n - 1] = x[1:]
        loss_mask[0, start : start + n - 1] = m[1:]
        start += n
    packed = {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg, "positions": pos}

    # unpacked: one right-padded row per sequence
    b = len(seqs)
    width = max(LENGTHS)
    rows = {k: np.zeros((b, width), np.int32) for k in packed}
    for r, (x, m) in enumerate(zip(seqs, targets_mask)):
        n = len(x)
        rows["input_ids"][r, :n] = x
        rows["targets"][r, : n - 1] = x[1:]
        rows["loss_mask"][r, : n - 1] = m[1:]
        rows["segment_ids"][r, :n] = 1
        rows["positions"][r, :n] = np.arange(n)

    packed_sum, packed_tokens = sft_loss_sums(trainable, frozen, graphdef, packed, chunk_size=7)
    rows_sum, rows_tokens = sft_loss_sums(trainable, frozen, graphdef, rows, chunk_size=7)
    assert int(packed_tokens) == int(rows_tokens) == sum(int(m[1:].sum()) for m in targets_mask)
    np.testing.assert_allclose(float(packed_sum), float(rows_sum), rtol=1e-6)
