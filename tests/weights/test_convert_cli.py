"""``grouprank import-hf`` / ``export-hf`` through the real CLI entry point."""

import numpy as np

from grouprank_jax.cli import main

from hf_utils import hf_logits, left_padded_batch, make_hf_model


def test_import_then_export_round_trip(tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = make_hf_model(tmp_path / "hf", tied=True)
    assert main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), attn_implementation="eager")
    ids, mask = left_padded_batch(np.random.default_rng(0), [4, 7], 512)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(hf_logits(hf, ids, mask)[valid], hf_logits(reloaded, ids, mask)[valid])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
