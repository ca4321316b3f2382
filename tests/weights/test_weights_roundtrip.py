"""HF -> ours -> HF round trips, sharded export, and clear errors on bad checkpoints."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from grouprank_jax.weights import CheckpointFormatError, load_hf, save_hf

from hf_utils import hf_logits, left_padded_batch, make_hf_model


def _all_tensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_bit_identical(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "src", tmp_path / "dst"
    hf = make_hf_model(src, tied=tied)
    save_hf(load_hf(src), dst)
    before, after = _all_tensors(src), _all_tensors(dst)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        str(dst), output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.tie_word_embeddings == tied
    ids, mask = left_padded_batch(np.random.default_rng(0), [6, 9], 512)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(hf_logits(hf, ids, mask)[valid], hf_logits(reloaded.eval(), ids, mask)[valid])


def test_sharded_export_with_index(tmp_path):
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf_model(src, tied=False)
    save_hf(load_hf(src), dst, max_shard_bytes=100_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((dst / f).exists() for f in files)
    _, info = AutoModelForCausalLM.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # and our loader reads the sharded layout back
    before, after = _all_tensors(src), _all_tensors(dst)
    reloaded = _all_tensors(_roundtrip(dst, tmp_path / "again"))
    for key in before:
        np.testing.assert_array_equal(before[key], reloaded[key])
    assert sorted(after) == sorted(before)


def _roundtrip(src, dst):
    save_hf(load_hf(src), dst)
    return dst


def test_bf16_export_keeps_dtype(tmp_path):
    import jax.numpy as jnp
    import ml_dtypes

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf_model(src, tied=True)
    save_hf(load_hf(src, dtype=jnp.bfloat16), dst)
    tensors = _all_tensors(dst)
    assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    save_hf(load_hf(src), dst, dtype="float16")
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"  # what the shards hold (was "float32")


def test_exported_config_is_read_alike_by_transformers_4_and_5(tmp_path):
    """transformers 5 keeps RoPE in ``rope_parameters``; 4.x (and vLLM builds on it) reads only a
    top-level ``rope_theta`` and would silently take 10,000 instead of Qwen2.5's 1e6."""
    from transformers import AutoConfig

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf_model(src, tied=True)
    model = load_hf(src)
    save_hf(model, dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == model.cfg.rope_theta
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert AutoConfig.from_pretrained(str(dst)).rope_parameters["rope_theta"] == model.cfg.rope_theta


def _corrupt(src, mutate):
    file = src / "model.safetensors"
    tensors = load_file(str(file))
    mutate(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_names_key(tmp_path):
    make_hf_model(tmp_path)
    _corrupt(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(tmp_path)


def test_wrong_shape_names_key_and_file(tmp_path):
    make_hf_model(tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    _corrupt(tmp_path, shrink)
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors.*k_proj\.weight.*shape"):
        load_hf(tmp_path)


def test_unexpected_tensor_names_key(tmp_path):
    make_hf_model(tmp_path)
    _corrupt(tmp_path, lambda t: t.__setitem__("model.layers.5.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.5\.extra\.weight"):
        load_hf(tmp_path)


def test_non_qwen2_config_names_file(tmp_path):
    make_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*llama"):
        load_hf(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nope")


def test_killed_re_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    """A re-export into the same directory killed while writing weights: the directory still
    holds the first export (config and weights of one model); a finished re-export replaces the
    weights, drops the old shard layout and keeps the user's own files."""
    import grouprank_jax.weights.hf_io as hf_io

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf_model(src, tied=False)
    model = load_hf(src)
    save_hf(model, dst, max_shard_bytes=100_000)  # sharded first export
    (dst / "README.md").write_text("my notes\n")
    first = {p.name: p.read_bytes() for p in dst.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing the new weights

    monkeypatch.setattr(hf_io, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_hf(model, dst, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == first
    monkeypatch.undo()

    save_hf(model, dst, dtype="bfloat16")  # one shard now, bf16
    names = {p.name for p in dst.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-0") for n in names)
    assert "model.safetensors.index.json" not in names and (dst / "README.md").read_text() == "my notes\n"
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.name for p in tmp_path.iterdir()} == {"src", "dst"}  # no partial/old directories left


class _Killed(BaseException):
    """The process dies here: no ``except Exception`` and no cleanup of ours runs."""


def test_a_kill_at_any_step_of_the_swap_loses_nothing(tmp_path, monkeypatch):
    """A re-export killed at each filesystem step of publishing it (every rename and delete, in
    turn): the next export completes, the user's own files in the directory survive, the new
    weights are in place, and no hidden directory is left behind. Before the fix the user's
    files were moved into ``.dst.partial`` first, which the next export deletes."""
    import pathlib
    import shutil

    src = tmp_path / "src"
    make_hf_model(src, tied=False)
    model = load_hf(src)
    real_rename, real_rmtree = pathlib.Path.rename, shutil.rmtree
    kill_at, killed_once = 1, True
    while killed_once:
        root = tmp_path / f"kill_{kill_at}"
        dst = root / "dst"
        save_hf(model, dst, max_shard_bytes=100_000)  # the previous export: fp32, sharded
        (dst / "README.md").write_text("my notes\n")
        (dst / "eval.json").write_text("{}\n")
        calls = {"n": 0, "kill_at": kill_at}

        def counted(real, calls=calls):
            def op(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["kill_at"]:
                    raise _Killed
                return real(*args, **kwargs)

            return op

        monkeypatch.setattr(pathlib.Path, "rename", counted(real_rename))
        monkeypatch.setattr(shutil, "rmtree", counted(real_rmtree))
        try:
            save_hf(model, dst, dtype="bfloat16")
            killed_once = False  # every step has been killed once
        except _Killed:
            pass
        monkeypatch.undo()

        save_hf(model, dst, dtype="bfloat16")  # the rerun after the kill
        names = {p.name for p in dst.iterdir()}
        assert (dst / "README.md").read_text() == "my notes\n", (kill_at, names)
        assert (dst / "eval.json").exists(), (kill_at, names)
        assert "model.safetensors" in names and not any(n.startswith("model-0") for n in names), (kill_at, names)
        assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
        assert {p.name for p in root.iterdir()} == {"dst"}, kill_at  # no .partial / .old left
        kill_at += 1
    assert kill_at > 4  # the swap's steps were all reached (rmtree of .partial, 2 renames, moves)


def test_export_into_a_symlinked_directory_writes_the_target(tmp_path):
    """``--out`` a symlink (e.g. to a bucket mount): the export used to rename the link itself,
    write a local directory in its place and then crash; the target stayed empty."""
    src, target, link = tmp_path / "src", tmp_path / "bucket" / "export", tmp_path / "work" / "export"
    make_hf_model(src, tied=True)
    target.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    save_hf(load_hf(src), link)
    save_hf(load_hf(src), link)  # a re-export swaps the target's contents too
    assert link.is_symlink() and (target / "model.safetensors").exists() and (target / "config.json").exists()
    assert sorted(p.name for p in link.parent.iterdir()) == ["export"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"intermediate_size": None}, r"missing \['intermediate_size'\]"),
        ("not a dict", "expected a JSON object"),
    ],
)
def test_unsupported_or_incomplete_config_names_file(tmp_path, change, message):
    from grouprank_jax.config import model_preset
    from grouprank_jax.weights.hf_io import read_hf_config

    hf = model_preset("tiny").to_hf_dict()
    hf = [hf] if change == "not a dict" else {k: v for k, v in {**hf, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=rf"config\.json: .*{message}"):
        read_hf_config(tmp_path)


def test_null_kv_heads_means_one_per_query_head(tmp_path):
    from grouprank_jax.config import model_preset
    from grouprank_jax.weights.hf_io import read_hf_config

    (tmp_path / "config.json").write_text(
        json.dumps({**model_preset("tiny").to_hf_dict(), "num_key_value_heads": None})
    )
    cfg = read_hf_config(tmp_path)
    assert cfg.num_kv_heads == cfg.num_heads


def test_init_from_a_checkpoint_of_another_shape_is_warned_about(tmp_path, caplog):
    """The checkpoint's architecture is trained, whatever model.preset says; a config naming
    another one (which `plan` and `compile` size) used to get no word about it."""
    from grouprank_jax.config import model_preset
    from grouprank_jax.weights.loading import initial_model

    make_hf_model(tmp_path / "hf", tied=True)
    same = load_hf(tmp_path / "hf").cfg
    with caplog.at_level("WARNING"):
        assert initial_model(str(tmp_path / "hf"), same.replace(remat="full"), None).cfg.hidden_size == same.hidden_size
    assert not caplog.records
    with caplog.at_level("WARNING"):
        model = initial_model(str(tmp_path / "hf"), model_preset("qwen2.5-7b"), None)
    assert model.cfg.hidden_size == same.hidden_size
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"hidden_size {same.hidden_size} (config: 3584)" in message and "num_layers" in message
