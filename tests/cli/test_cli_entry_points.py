"""Every user-facing command runs for real at least once: ``generate``, ``bench``, ``demo --help``
and ``export-hf`` from a LoRA GRPO run directory (``sft``/``grpo`` run as real processes in
test_resume.py, ``plan``/``compile`` in test_plan.py / test_compile.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from grouprank_jax.cli import main
from grouprank_jax.config import model_preset


def test_demo_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "grouprank_jax.cli", "demo", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout and "ci" in out.stdout


def test_generate_cli_greedy_matches_the_sampler(tmp_path):
    from grouprank_jax.models import create_model
    from grouprank_jax.sampling import Sampler, SamplingParams
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import load_hf, save_hf

    tok = load_tokenizer()
    save_hf(create_model(model_preset("tiny"), seed=3), tmp_path / "hf", tokenizer=tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Rank these documents"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hello"}]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "hf"),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--n",
                "2",
                "--temperature",
                "0",
                "--max-new-tokens",
                "6",
                "--max-prompt-len",
                "64",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[0]["token_ids"] == rows[1]["token_ids"] and len(rows[0]["logprobs"]) == len(rows[0]["token_ids"])
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    direct = Sampler(load_hf(tmp_path / "hf"), tokenizer=tok, max_prompt_len=64).generate(
        [tok.encode("Rank these documents", add_special_tokens=False), tok.encode(text, add_special_tokens=False)],
        SamplingParams(temperature=0.0, max_new_tokens=6),
    )
    for prompt in (0, 1):
        want = direct.tokens[prompt, : direct.lengths[prompt]].tolist()
        assert rows[2 * prompt]["token_ids"] == want
        assert rows[2 * prompt]["text"] == direct.texts[prompt]


def test_generate_names_the_line_of_a_bad_prompt_before_generating(tmp_path, capsys):
    """Each prompt line is checked before the first batch runs: an over-long prompt or a chat
    message the template cannot render is ``file:line`` and exit 2 before the model loads (they
    were "prompt 0 has ..." after earlier batches were written, and an "unexpected" exit 1);
    ``prompt_ids`` outside the model's vocabulary are named once the model is known."""
    from grouprank_jax.models import create_model
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import save_hf

    save_hf(create_model(model_preset("tiny"), seed=3), tmp_path / "hf", tokenizer=load_tokenizer())
    good = json.dumps({"prompt": "a short prompt"})
    cases = [
        (json.dumps({"prompt": "word " * 100}), "the prompt has 101 tokens, over --max-prompt-len 64"),
        (json.dumps({"messages": [{"role": "user"}]}), "cannot render 'messages'"),
        (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), "cannot render 'messages'"),
        (json.dumps({"prompt_ids": [1, 151936]}), "prompt_ids outside the model's vocabulary [0, 151936)"),
    ]
    for bad, message in cases:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(f"{good}\n\n{bad}\n")
        out = tmp_path / "out.jsonl"
        out.unlink(missing_ok=True)
        argv = ["generate", "--model", str(tmp_path / "hf"), "--prompts", str(prompts), "--out", str(out)]
        assert main(argv + ["--batch-size", "1", "--max-prompt-len", "64", "--max-new-tokens", "2"]) == 2, bad
        err = capsys.readouterr().err
        assert f"grouprank generate: error: {prompts}:3: " in err and message in err, err
        assert not out.exists()  # nothing generated before the check
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "m", "--prompts", "p", "--out", "o", "--seed", "-1"])
    assert exit_.value.code == 2
    assert "argument --seed: must be in [0, 2**32), got -1" in capsys.readouterr().err


def test_generate_samples_do_not_depend_on_batch_size(tmp_path):
    """Prompt i draws from (--seed, i): cutting the file into other batches changes nothing."""
    from grouprank_jax.models import create_model
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import save_hf

    save_hf(create_model(model_preset("tiny"), seed=3), tmp_path / "hf", tokenizer=load_tokenizer())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(3)))
    outs = {}
    for size in ("1", "3"):
        out = tmp_path / f"out{size}.jsonl"
        argv = ["generate", "--model", str(tmp_path / "hf"), "--prompts", str(prompts), "--out", str(out)]
        flags = ["--batch-size", size, "--n", "2", "--temperature", "1.0", "--seed", "5", "--max-new-tokens", "6"]
        assert main(argv + flags) == 0
        outs[size] = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    assert len(outs["1"]) == 6 and outs["1"] == outs["3"]
    assert len({tuple(t) for t in outs["1"]}) > 1


def test_bench_train_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "train",
                "--preset",
                "tiny-smallvocab",
                "--batch",
                "8",
                "--seq-len",
                "64",
                "--steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["tokens_per_s"] > 0 and result["batch"] == 8 and result["devices"] == 8
    assert "tokens_per_s" in capsys.readouterr().out


def test_bench_help_names_the_benchmark(capsys):
    """``grouprank bench NAME --help`` prints NAME's arguments under its full command name."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "grpo-update", "--help"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: grouprank bench grpo-update ") and "--response-len" in captured.out
    assert "devices" not in captured.err  # no device set-up for a help page


def test_bench_shared_prefix_cli_checks_identical_outputs(tmp_path, capsys):
    out = tmp_path / "shared.json"
    args = ["--prompts", "2", "--n", "3", "--prompt-len", "64", "--new-tokens", "4", "--layers", "1"]
    assert main(["bench", "shared-prefix", *args, "--hidden", "64", "--out", str(out)]) == 0
    results = {r["layout"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"shared", "separate", "per_row"}
    assert results["separate"]["prompts"] == 6 and results["shared"]["prompts"] == 2
    assert "outputs identical" in capsys.readouterr().out


def test_export_hf_from_a_lora_grpo_run_dir(tmp_path):
    """A LoRA GRPO run directory exports with its adapters merged: transformers' model from the
    export equals our model with the adapters on (and differs from the base weights)."""
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.rl.trainer import train_grpo

    rows = [
        {
            "query": f"topic{i % 3}",
            "documents": [f"passage {j} on topic{j % 3}" for j in range(5)],
            "gold": [10 if j % 3 == i % 3 else 0 for j in range(5)],
        }
        for i in range(4)
    ]
    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "run_dir": str(tmp_path / "grpo"),
            "grpo": {
                "rollouts_per_prompt": 2,
                "global_batch_prompts": 2,
                "mini_batch_prompts": 2,
                "max_prompt_len": 256,
                "max_response_len": 8,
                "group_sampling": "redraw",
                "group_size_min": 3,
                "group_size_max": 4,
                "lora_rank": 4,
                "lora_alpha": 8.0,
                "learning_rate": 0.05,
                "entropy_coef": 0.1,
            },
            "checkpoint": {"save_every": 1, "async_save": False},
        }
    )
    result = train_grpo(cfg, records=records_from_rows(rows, purpose="rl"), max_steps=2, progress=False)
    lora_b = [
        np.abs(np.asarray(v.get_value())).max()
        for k, v in nnx.to_flat_state(nnx.state(result.model, nnx.LoRAParam))
        if tuple(map(str, k[-2:])) == ("lora", "b")
    ]
    assert max(lora_b) > 0  # the adapters moved, so merging them matters

    assert main(["export-hf", "--checkpoint", str(tmp_path / "grpo"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(3, 151000, (2, 11))
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    ours = np.asarray(result.model(ids))
    base = np.asarray(result.model(ids, use_lora=False))
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(base - theirs).max() > 100 * np.abs(ours - theirs).max()
