"""Config values take their field's declared type, from a YAML file or a ``key=value`` override:
PyYAML (YAML 1.1) reads ``1e-5`` as a string, which must become the float the field declares,
and a value of the wrong kind is an error that names the key, before anything runs."""

import re

import jax.numpy as jnp
import pytest

from grouprank_jax.config.run import load_run_config, run_config_from_dict
from grouprank_jax.rl.step import make_grpo_optimizer
from grouprank_jax.sft.step import make_sft_optimizer

from conftest import REPO

CONFIG = REPO / "configs" / "grpo_qwen2.5-7b_v5p-64.yaml"


def test_exponent_floats_from_overrides_and_files_are_floats(tmp_path):
    run = load_run_config(
        CONFIG, ["grpo.learning_rate=1e-5", "sft.learning_rate=3e-5", "grpo.kl_coef=1e-3", "model.rope_theta=1e6"]
    )
    assert (run.grpo.learning_rate, run.sft.learning_rate, run.grpo.kl_coef) == (1e-5, 3e-5, 1e-3)
    assert type(run.grpo.learning_rate) is float and run.model.rope_theta == 1e6
    # The optimizers build (they failed with "unsupported operand type(s) for -: 'float' and 'str'").
    params = {"w": jnp.ones((2, 2))}
    for tx in (make_sft_optimizer(run.sft, total_steps=10), make_grpo_optimizer(run.grpo, total_updates=10)):
        tx.update(params, tx.init(params), params)
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny}\nsft: {learning_rate: 2e-5, warmup_ratio: 0}\nseed: 1e3\n")
    run = load_run_config(path)
    assert run.sft.learning_rate == 2e-5 and type(run.sft.warmup_ratio) is float and run.seed == 1000


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.learning_rate=fast", "grpo.learning_rate: expected float, got 'fast'"),
        ("grpo.rollouts_per_prompt=2.5", "grpo.rollouts_per_prompt: expected int, got 2.5"),
        ("sft.packing=maybe", "sft.packing: expected bool, got 'maybe'"),
        ("model.num_layers=many", "model.num_layers: expected int, got 'many'"),
        ("seed=x", "seed: expected int, got 'x'"),
        ("sft.length_buckets={a: 1}", "sft.length_buckets: expected a list, e.g. [a, b]"),
        ("sft.length_buckets=big", "sft.length_buckets[0]: expected int, got 'big'"),
        ("sft.grad_accum_steps=0", "sft.grad_accum_steps must be >= 1, got 0"),
        ("sft.truncation=middle", "sft.truncation='middle'; choose 'error', 'left' or 'right'"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_run_config(CONFIG, [override])
    assert str(CONFIG) in str(err.value)


def test_an_override_into_a_section_left_empty_in_the_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny}\nsft:\n")  # `sft:` holds null
    assert load_run_config(path, ["sft.learning_rate=1e-4"]).sft.learning_rate == 1e-4


def test_one_value_for_a_list_field_is_a_list_of_one():
    """``data.sft_train=a.jsonl`` on the command line (no brackets) used to stay a string, which
    was then read as the files "/", "t", "m", ... ("/: file not found")."""
    run = load_run_config(CONFIG, ["data.sft_train=/data/a.jsonl", "sft.length_buckets=512", "sft.lora_targets=q_proj"])
    assert run.data.sft_train == ("/data/a.jsonl",)
    assert run.sft.length_buckets == (512,) and run.sft.lora_targets == ("q_proj",)


@pytest.mark.parametrize("key", ["lora_rank", "lora_alpha", "lora_targets"])
def test_model_lora_keys_point_to_the_stage_that_uses_them(key):
    with pytest.raises(ValueError, match=rf"model\.{key} is set per stage: use sft\.{key} / grpo\.{key}"):
        load_run_config(CONFIG, [f"model.{key}=[q_proj]" if key == "lora_targets" else f"model.{key}=8"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_round_trips_through_to_dict(path):
    from grouprank_jax.config import to_dict

    run = load_run_config(path)
    assert run_config_from_dict(to_dict(run)) == run


@pytest.mark.parametrize("key", ["run_dir", "init_from"])
def test_bucket_urls_are_refused_with_the_mount_advice(key):
    """pathlib reads gs://b/x as the local directory gs:/b/x: checkpoints would stay on the VM."""
    with pytest.raises(ValueError, match=rf"{key}='gs://my-bucket/runs/x'.*gcsfuse.*{key}=/tmp/gcs/runs/x"):
        run_config_from_dict({key: "gs://my-bucket/runs/x"})
    assert getattr(run_config_from_dict({key: "/tmp/gcs/runs/x"}), key) == "/tmp/gcs/runs/x"
