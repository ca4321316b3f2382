"""The pre-flight planner: topology parsing, divisibility and batch checks, the paper configs,
``grouprank plan`` exit codes (the estimate against TPU XLA's own accounting is in
test_compile.py)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from grouprank_jax import cli
from grouprank_jax.config import MeshConfig, ModelConfig
from grouprank_jax.config.run import load_run_config, run_config_from_dict
from grouprank_jax.models.kv_cache import KVCache
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.parallel.mesh import make_mesh
from grouprank_jax.preflight import memory, shapes
from grouprank_jax.preflight import plan as pl

from conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "text, devices, hosts, slices, hbm",
    [
        ("v5p-64", 32, 8, 1, 95.0),
        ("v4-8", 4, 1, 1, 32.0),
        ("v4-512", 256, 64, 1, 32.0),
        ("v5e-8", 8, 1, 1, 16.0),
        ("v5litepod-256", 256, 64, 1, 16.0),
        ("v6e-8", 8, 1, 1, 32.0),
        ("v6e-256x2", 512, 64, 2, 32.0),
        ("2x8xh200", 16, 2, 1, 140.4),
        ("1x8xh100-80g", 8, 1, 1, 79.6),
    ],
)
def test_parse_topology(text, devices, hosts, slices, hbm):
    t = pl.parse_topology(text)
    assert (t.num_devices, t.hosts, t.num_slices, t.chip.hbm_gib) == (devices, hosts, slices, hbm)
    assert t.num_processes == hosts * slices


@pytest.mark.parametrize("bad", ["v5p-63", "v7x", "8xh200", "tpu-64"])
def test_parse_topology_rejects(bad):
    with pytest.raises(ValueError, match="v5p-64|multiples of 8"):
        pl.parse_topology(bad)


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SMALL_SFT = """model: {preset: qwen2.5-0.5b, dtype: bfloat16, remat: full}
mesh: {data: 1, fsdp: -1, tensor: TENSOR}
sft: {per_device_batch: 1, grad_accum_steps: 1, max_seq_len: 8192}
"""


def test_cli_flags_heads_not_divisible(tmp_path, capsys):
    cfg = _write(tmp_path, "sft_bad.yaml", SMALL_SFT.replace("TENSOR", "4"))
    assert cli.main(["plan", "--config", cfg, "--topology", "v5p-64"]) != 0
    out = capsys.readouterr().out
    assert "heads=14 is not divisible by tensor=4" in out
    assert "kv_heads=2 is not divisible by tensor=4" in out


def test_cli_passes_good_config_and_applies_overrides(tmp_path, capsys):
    cfg = _write(tmp_path, "sft_good.yaml", SMALL_SFT.replace("TENSOR", "2"))
    assert cli.main(["plan", "--config", cfg, "--topology", "v5p-64"]) == 0
    out = capsys.readouterr().out
    assert "[sft]" in out and "[grpo]" not in out and "fits" in out and "\nOK" in out
    grpo = str(REPO / "configs" / "grpo_qwen2.5-7b_2x8xh200.yaml")
    assert cli.main(["plan", "--config", grpo, "--topology", "2x8xh200", "mesh.fsdp=2", "mesh.tensor=8"]) == 1
    assert "kv_heads=4 is not divisible by tensor=8" in capsys.readouterr().out


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    cfg = _write(tmp_path, "sft_good.yaml", SMALL_SFT.replace("TENSOR", "2"))
    assert cli.main(["plan", "--config", cfg, "--topology", "v9-64"]) == 2
    assert cli.main(["plan", "--config", str(tmp_path / "missing.yaml"), "--topology", "v5p-64"]) == 2


def test_batch_and_process_divisibility():
    run = run_config_from_dict(
        {
            "model": {"preset": "qwen2.5-0.5b", "dtype": "bfloat16", "remat": "full"},
            "mesh": {"fsdp": -1, "tensor": 1},
            "grpo": {
                "global_batch_prompts": 10,
                "mini_batch_prompts": 10,
                "max_prompt_len": 2048,
                "max_response_len": 1024,
            },
        }
    )
    report = pl.plan(run, pl.parse_topology("v5p-64"), stages=("grpo",))
    text = "\n".join(report.violations)
    assert "global_batch_prompts x G=80 is not divisible by data*fsdp=32" in text
    assert "global_batch_prompts=10 does not split over 8 processes" in text
    assert not report.ok
    sliced = pl.plan(run, pl.parse_topology("v6e-256x2"), stages=("grpo",))
    assert any("set mesh.num_slices=2" in v for v in sliced.violations)


def test_memory_violation_is_actionable():
    run = run_config_from_dict(
        {"model": {"preset": "qwen2.5-7b", "remat": "none"}, "mesh": {"fsdp": -1}, "sft": {"per_device_batch": 4}}
    )
    report = pl.plan(run, pl.parse_topology("v5p-64"), stages=("sft",))
    assert any("exceeds the 95.74 GiB budget" in v and "remat=full" in v for v in report.violations)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_paper_configs_load_and_fit_their_topology(path):
    cfg = load_run_config(path)
    topology = pl.parse_topology(path.stem.rsplit("_", 1)[1])
    stage = path.stem.split("_", 1)[0]
    report = pl.plan(cfg, topology, stages=(stage,))
    assert report.ok, report.table()
    assert report.stages[0].peak < report.stages[0].budget


def test_model_params_follow_the_model():
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=False,
        lora_rank=4,
    )
    params = shapes.model_params(cfg)
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    real = {"/".join(map(str, k)): v.get_value().shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {p.path: p.shape for p in params} == real
    assert sum(1 for p in params if p.lora) == 3 * 14


def test_kv_cache_estimate_matches_allocation():
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        dtype="bfloat16",
    )
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    cache = KVCache.init(2, 16, 96, 2, 16, jnp.bfloat16, mesh=mesh)
    per_device = sum(2 * x.addressable_shards[0].data.nbytes for x in cache.k)
    shape = shapes.ModelShape(cfg, {"data": 1, "fsdp": 4, "tensor": 2}, lora=False)
    assert memory.kv_cache_bytes(shape, 16 // 4, 96) == per_device


def test_plan_reads_grpo_micro_batch_rows_in_trainer_units():
    """``grpo.micro_batch_rows`` counts rows of the whole mini-batch per pass (the trainer's unit):
    the update's activations follow it, and values that do not split are violations."""
    base = {
        "model": {"preset": "qwen2.5-0.5b", "dtype": "bfloat16", "remat": "full"},
        "mesh": {"fsdp": -1, "tensor": 1},
        "grpo": {
            "global_batch_prompts": 8,
            "mini_batch_prompts": 8,
            "max_prompt_len": 2048,
            "max_response_len": 1024,
            "shared_prefix": False,
        },
    }
    topology = pl.parse_topology("v5p-64")  # 32 batch shards
    one_pass = pl.plan(run_config_from_dict(base), topology, stages=("grpo",))
    base["grpo"]["micro_batch_rows"] = 32  # one row per shard per pass
    per_row = pl.plan(run_config_from_dict(base), topology, stages=("grpo",))
    update = lambda r: next(f for f in r.stages[0].functions if f.name == "grpo_update")
    act = lambda r: next(x.bytes for x in update(r).lines if x.name == "activations")
    assert act(one_pass) == pytest.approx(2 * act(per_row), rel=1e-6)  # 64 rows = 2 per shard vs 1
    # Shared prefix, one pass: 8 prompts do not split over 32 shards, so the prompt forward is
    # replicated: a chip runs all 8 2048-token prompts and its share of the responses (2 x 1024),
    # 18,432 tokens where per-rollout runs 2 x 3072 (a warning says so).
    del base["grpo"]["micro_batch_rows"]
    base["grpo"]["shared_prefix"] = True
    shared = pl.plan(run_config_from_dict(base), topology, stages=("grpo",))
    assert act(shared) == pytest.approx(act(one_pass) * 18432 / 6144, rel=1e-6)
    assert any(x.name == "prompt KV (shared)" and "8 prompts" in x.note for x in update(shared).lines)
    assert any("holds 8 prompts per pass, not a multiple of data*fsdp=32" in w for w in shared.warnings)
    # On 8 shards (v5p-16) each chip runs one prompt and its 8 responses: 2048 + 8 x 1024 tokens
    # where per-rollout runs 8 x 3072; no warning.
    small = pl.parse_topology("v5p-16")
    shared8 = pl.plan(run_config_from_dict(base), small, stages=("grpo",))
    base["grpo"]["shared_prefix"] = False
    per_row8 = pl.plan(run_config_from_dict(base), small, stages=("grpo",))
    base["grpo"]["shared_prefix"] = True
    assert act(shared8) == pytest.approx(act(per_row8) * 10240 / 24576, rel=1e-6)
    assert not shared8.warnings
    base["grpo"]["micro_batch_rows"] = 12  # not whole prompts of G = 8
    with pytest.raises(ValueError, match="whole prompts"):
        run_config_from_dict(base)
    base["grpo"]["shared_prefix"] = False
    base["grpo"]["micro_batch_rows"] = 48
    bad = pl.plan(run_config_from_dict(base), topology, stages=("grpo",))
    assert any("micro_batch_rows=48 does not divide" in v for v in bad.violations)
    assert any("micro_batch_rows=48 is not a multiple of data*fsdp=32" in v for v in bad.violations)


def test_sampler_estimates_follow_the_samplers_power_of_two_batch():
    """The sampler pads 12 prompts to 16 (``Sampler.bucket_shape``) and compiles that program:
    the plan's prefill and decode for 12 prompts are the 16-prompt ones (they were 3/4 of them)."""
    sizes = {}
    for prompts in (12, 16):
        run = run_config_from_dict(
            {
                "model": {"preset": "qwen2.5-0.5b", "dtype": "bfloat16"},
                "mesh": {"fsdp": -1, "tensor": 1},
                "grpo": {"global_batch_prompts": prompts, "mini_batch_prompts": 4, "max_prompt_len": 2048},
            }
        )
        est = memory.function_estimates(run, pl.parse_topology("v5p-8"), ("grpo",))
        sizes[prompts] = (est["sampler_prefill"], est["sampler_decode"])
    assert sizes[12] == sizes[16]


def test_optimizer_gradient_and_reference_bytes_follow_the_param_dtype():
    """optax's AdamW keeps mu and nu in the parameters' dtype: with bf16 parameters the plan's
    optimizer line equals the abstract train state's (it assumed fp32, twice the real size)."""
    from grouprank_jax.preflight.aot import abstract_train_state
    from grouprank_jax.sft.step import make_sft_optimizer

    for dtype in ("float32", "bfloat16"):
        run = run_config_from_dict({"model": {"preset": "tiny", "param_dtype": dtype}, "mesh": {"fsdp": 4}})
        mesh = make_mesh(run.mesh, jax.devices()[:4])
        state = abstract_train_state(run.model, mesh, make_sft_optimizer(run.sft, 10), lora=False)
        real = sum(_shard_bytes(x) for x in jax.tree.leaves(state.opt_state))
        (sft,) = memory.stage_functions(run, "sft", {"data": 1, "fsdp": 4, "tensor": 1}, "tpu")
        planned = next(x.bytes for x in sft.lines if x.name == "optimizer (AdamW)")
        assert planned == pytest.approx(real, rel=0.01), (dtype, planned, real)
        shape = shapes.ModelShape(run.model, {"data": 1, "fsdp": 4, "tensor": 1}, lora=False)
        assert shape.trainable_bytes == pytest.approx(sum(_shard_bytes(x) for x in jax.tree.leaves(state.trainable)))


def _shard_bytes(x) -> int:
    import math

    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
