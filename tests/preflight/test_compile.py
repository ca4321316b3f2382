"""``grouprank compile``: the run's own programs compiled for real TPU slices from this CPU host
(libtpu describes the slice, TPU XLA compiles and sizes the programs), and the planner held to
TPU XLA's figures."""

import functools
import json

import pytest

from grouprank_jax.cli import main
from grouprank_jax.config.run import run_config_from_dict
from grouprank_jax.preflight.aot import compile_run
from grouprank_jax.preflight.memory import function_estimates
from grouprank_jax.preflight.topology import parse_topology

TINY = {
    "model": {"preset": "tiny", "dtype": "bfloat16", "remat": "full", "attention_impl": "splash"},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "sft": {"per_device_batch": 1, "grad_accum_steps": 2, "max_seq_len": 1024},
    "grpo": {
        "rollouts_per_prompt": 4,
        "global_batch_prompts": 4,
        "mini_batch_prompts": 4,
        "micro_batch_rows": 8,
        "max_prompt_len": 512,
        "max_response_len": 128,
    },
}


def _write(tmp_path, name, tree) -> str:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("topology", ["v5p-8", "v5e-8"])
def test_compile_cli_tiny_sft_and_grpo_with_splash(tmp_path, capsys, topology):
    cfg = _write(tmp_path, "tiny.yaml", TINY)
    rc = main(
        ["compile", "--config", cfg, "--topology", topology, "--phase", "all", "--dump-hlo", str(tmp_path / "hlo")]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("sft_step", "grpo_update", "grpo_ref_logprobs", "sampler_prefill", "sampler_decode"):
        assert f"| {name} |" in out
    assert "OK: every function compiles and fits" in out
    # The fused kernel is really in the programs that run full-sequence attention.
    for name in ("sft_step", "grpo_update", "grpo_ref_logprobs", "sampler_prefill"):
        assert "tpu_custom_call" in (tmp_path / "hlo" / f"{name}.hlo.txt").read_text(), name
    assert "tpu_custom_call" not in (tmp_path / "hlo" / "sampler_decode.hlo.txt").read_text()  # decode: chunked


def test_compile_the_0p5b_sft_run_config(tmp_path, capsys):
    """The Qwen2.5-0.5B shape at full depth (24 layers), its SFT step; the GRPO programs are
    compiled at 0.5B width by the planner checks below and at full depth for the tiny model."""
    cfg = _write(
        tmp_path,
        "sft_0p5b.yaml",
        {
            "model": {"preset": "qwen2.5-0.5b", "dtype": "bfloat16", "remat": "full"},  # auto -> splash on TPU
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "sft": {"per_device_batch": 1, "grad_accum_steps": 2, "max_seq_len": 2048},
        },
    )
    assert main(["compile", "--config", cfg, "--topology", "v5p-8", "--dump-hlo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK: every function compiles and fits" in out
    assert "tpu_custom_call" in (tmp_path / "sft_step.hlo.txt").read_text()
    (row,) = [line for line in out.splitlines() if line.startswith("| sft_step |")]
    ratio = float(row.strip("| ").split("|")[-1])  # the planner's estimate / XLA's figure (remat full)
    assert 0.9 <= ratio <= 3.0, row


def test_a_function_that_cannot_fit_exits_nonzero_naming_it(tmp_path, capsys):
    tree = json.loads(json.dumps(TINY))
    tree["model"].update(preset="qwen2.5-7b", num_layers=2, remat="none")
    tree["sft"].update(per_device_batch=16, max_seq_len=32768)
    cfg = _write(tmp_path, "sft_too_big.yaml", tree)
    assert main(["compile", "--config", cfg, "--topology", "v5e-4", "--phase", "sft"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: sft_step" in out and "sft.per_device_batch" in out


def test_bad_inputs_exit_2(tmp_path, capsys):
    cfg = _write(tmp_path, "tiny.yaml", TINY)
    assert main(["compile", "--config", cfg, "--topology", "v9-8"]) == 2
    assert main(["compile", "--config", cfg, "--topology", "2x8xh200"]) == 2
    assert "not GPUs" in capsys.readouterr().err


# The planner against TPU XLA: never more than 10 % below XLA's per-chip figure for the same
# program (an estimate that runs low is the dangerous direction). Shapes where XLA has ample HBM
# to spare: its figures are then close to what the programs need (on a nearly full chip XLA's
# scheduler also spends free HBM, so larger shapes are compared in docs/scale_out.md instead).
PLANNER_CASES = {  # name: (model, tensor, phases)
    "0.5b-none": ({"preset": "qwen2.5-0.5b", "num_layers": 4, "remat": "none"}, 1, ("sft",)),
    "0.5b-dots": ({"preset": "qwen2.5-0.5b", "num_layers": 4, "remat": "dots_saveable"}, 1, ("sft",)),
    "1.5b-full-tensor2": ({"preset": "qwen2.5-1.5b", "num_layers": 4, "remat": "full"}, 2, ("sft", "grpo")),
}


@pytest.mark.parametrize("case", sorted(PLANNER_CASES))
def test_planner_never_runs_more_than_10_percent_below_tpu_xla(case):
    model, tensor, phases = PLANNER_CASES[case]
    run = run_config_from_dict(
        {
            "model": {**model, "dtype": "bfloat16"},
            "mesh": {"data": 1, "fsdp": -1, "tensor": tensor},
            "sft": {"per_device_batch": 1, "grad_accum_steps": 2, "max_seq_len": 4096},
            "grpo": {
                "rollouts_per_prompt": 4,
                "global_batch_prompts": 4,
                "mini_batch_prompts": 4,
                "micro_batch_rows": 4,
                "max_prompt_len": 3072,
                "max_response_len": 1024,
                "lora_rank": 16,
            },
        }
    )
    topology = parse_topology("v5p-8")
    report = compile_run(run, topology, phases)
    estimates = function_estimates(run, topology, phases)
    for fn in report.functions:
        assert fn.ok, fn.error
        ratio = estimates[fn.name] / fn.xla_bytes
        assert ratio >= 0.9, (
            f"{case} {fn.name}: plan {estimates[fn.name] / 2**30:.3f} GiB vs XLA {fn.xla_bytes / 2**30:.3f}"
        )
        assert ratio <= 3.0, f"{case} {fn.name}: plan/XLA = {ratio:.2f}"


def test_shared_prefix_decode_holds_one_prompt_copy_on_tpu():
    """TPU XLA's own figures for the GRPO sampler's decode program, G = 8 rollouts per prompt
    (one prompt per chip): sharing, the program's arguments hold the prompt KV once instead of 8
    rows x P + C slots, and its loop works on suffix-sized buffers (the while loop keeps two
    copies of what it writes), so its temporaries shrink by at least twice the difference."""
    from grouprank_jax.preflight import memory, shapes

    figures = {}
    for shared in (True, False):
        run = run_config_from_dict(
            {
                "model": {"preset": "qwen2.5-0.5b", "num_layers": 2, "dtype": "bfloat16"},
                "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
                "grpo": {
                    "rollouts_per_prompt": 8,
                    "global_batch_prompts": 4,
                    "mini_batch_prompts": 4,
                    "max_prompt_len": 4096,
                    "max_response_len": 256,
                    "shared_prefix_sampling": shared,
                },
            }
        )
        (fn,) = compile_run(run, parse_topology("v5p-8"), ("grpo",), only=("sampler_decode",)).functions
        assert fn.ok, fn.error
        figures[shared] = fn
    shape = shapes.ModelShape(run.model, {"data": 1, "fsdp": 4, "tensor": 1}, lora=False)
    kv = functools.partial(memory.kv_cache_bytes, shape)
    per_row_kv, prompt_kv, suffix_kv = kv(8, 4096 + 256), kv(1, 4096), kv(8, 256)
    args_saved = figures[False].argument_bytes - figures[True].argument_bytes
    assert abs(args_saved - (per_row_kv - prompt_kv)) <= 2**20, (args_saved, per_row_kv, prompt_kv)
    temp_saved = figures[False].temp_bytes - figures[True].temp_bytes
    assert temp_saved >= 2 * (per_row_kv - suffix_kv), (temp_saved, per_row_kv, suffix_kv)
