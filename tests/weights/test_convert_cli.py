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


def test_conversions_load_onto_one_host_cpu_device(tmp_path, monkeypatch):
    """import-hf/export-hf place the model on the host CPU, not on the first accelerator chip
    (a 32B fp32 model, 122 GiB, does not fit one). Here every device is a CPU, so the mesh the
    commands pass is what is checked."""
    import grouprank_jax.commands.convert as convert

    meshes = []

    def recording(load):
        def wrapped(*args, **kwargs):
            meshes.append(kwargs.get("mesh"))
            return load(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(convert, "load_hf", recording(convert.load_hf))
    monkeypatch.setattr(convert, "load_model", recording(convert.load_model))
    make_hf_model(tmp_path / "hf", tied=True)
    assert main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert len(meshes) == 2
    for mesh in meshes:
        assert mesh is not None and mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"


def test_a_truncated_shard_is_named_and_exits_2(tmp_path, capsys):
    """An interrupted copy of a safetensors shard used to be an "unexpected SafetensorError"
    (exit 1) naming no file."""
    make_hf_model(tmp_path / "hf", tied=True)
    capsys.readouterr()
    shard = tmp_path / "hf" / "model.safetensors"
    for size in (40, shard.stat().st_size // 2):  # a cut header, then cut tensor data
        data = shard.read_bytes()
        shard.write_bytes(data[:size])
        assert main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert line.startswith(f"grouprank import-hf: error: {shard}: ") and "copy" in line, line
        shard.write_bytes(data)
