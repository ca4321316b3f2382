"""One error policy for every command, run as real processes: a realistic mistake per command
exits 2 with one line ``grouprank <command>: error: ...`` that names the file, line, key or flag
at fault and no traceback; an unexpected failure exits 1 with its type and a ``-v`` hint, and
shows the traceback only with ``-v``."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _grouprank(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "grouprank_jax.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def _config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _mistakes(tmp_path):
    """(command line, text the one-line error must contain) per command."""
    bad_run = tmp_path / "bad.run"
    bad_run.write_text("q1 Q0 d1 1 0.5\n")  # 5 fields
    qrels = tmp_path / "q.qrels"
    qrels.write_text("q1 0 d1 1\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n{not json\n")
    rl = tmp_path / "rl.jsonl"
    rl.write_text(
        json.dumps({"query": "q", "documents": ["a", "b"], "gold": [1, 0]}) + "\n" + json.dumps({"query": "q"}) + "\n"
    )
    grpo_cfg = _config(tmp_path, f"model: {{preset: tiny}}\ndata: {{rl_train: [{rl}]}}\nrun_dir: {tmp_path / 'run'}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "demo": (("demo", "--preset", "huge"), "invalid choice: 'huge'"),
        "retrieve": (("retrieve", "--data", tmp_path / "nowhere", "--out", tmp_path / "o.run"), "nowhere"),
        "sft": (
            ("sft", "--config", REPO / "configs" / "sft_qwen2.5-7b_v5p-64.yaml", "sft.learning_rat=1e-5"),
            "unknown keys ['learning_rat']",
        ),
        "grpo": (("grpo", "--config", grpo_cfg), f"{rl}:2"),
        "plot": (("plot", empty), "metrics.jsonl"),
        "rerank": (
            ("rerank", "--model", empty, "--data", tmp_path / "nowhere.json", "--out", tmp_path / "o"),
            "nowhere.json",
        ),
        "eval": (("eval", "--run", bad_run, "--qrels", qrels), f"{bad_run}:1"),
        "generate": (
            ("generate", "--model", empty, "--prompts", prompts, "--out", tmp_path / "o.jsonl"),
            f"{prompts}:2",
        ),
        "import-hf": (("import-hf", "--hf", empty, "--out", tmp_path / "ckpt"), "config.json"),
        "export-hf": (("export-hf", "--checkpoint", empty, "--out", tmp_path / "hf"), "is not a model"),
        "plan": (
            ("plan", "--config", REPO / "configs" / "sft_qwen2.5-7b_v5p-64.yaml", "--topology", "v9-64"),
            "topology 'v9-64' not understood",
        ),
        "compile": (
            (
                "compile",
                "--config",
                REPO / "configs" / "sft_qwen2.5-7b_v5p-64.yaml",
                "--topology",
                "v5p-64",
                "mesh.fsdp=3",
            ),
            "mesh",
        ),
        "bench": (("bench", "train", "--preset", "qwen9-1b"), "unknown model preset 'qwen9-1b'"),
        "synth": (
            (
                "synth",
                "--data",
                tmp_path / "nowhere.json",
                "--out",
                tmp_path / "synth",
                "--pointwise-url",
                "http://127.0.0.1:9",
                "--pointwise-model",
                "teacher",
            ),
            "nowhere.json",
        ),
        "serve": (("serve", "--model", empty, "--port", "0"), "--port must be >= 1"),
    }


COMMANDS = [
    "demo",
    "retrieve",
    "sft",
    "grpo",
    "plot",
    "rerank",
    "eval",
    "generate",
    "import-hf",
    "export-hf",
    "plan",
    "compile",
    "bench",
    "synth",
    "serve",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistake_is_one_line_and_exit_2(tmp_path, command):
    args, names = _mistakes(tmp_path)[command]
    out = _grouprank(*args)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"grouprank {command}: error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert names in errors[0], errors[0]


def test_every_command_has_an_example_in_its_help():
    # Every command's --help in one process (one interpreter start instead of 15), each through
    # the CLI's own main(); --help exits 0 through argparse's SystemExit.
    script = (
        "import contextlib, io, sys\n"
        "from grouprank_jax.cli import main\n"
        "for command in sys.argv[1:]:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "            code = 'returned'\n"
        "        except SystemExit as exit_:\n"
        "            code = exit_.code\n"
        "    print(command, code, 'example: grouprank' in out.getvalue())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", script, *COMMANDS], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [f"{command} 0 True" for command in COMMANDS], out.stdout
    top = _grouprank("--help")
    assert top.returncode == 0 and "scale-out:" in top.stdout and "e.g. grouprank compile" in top.stdout
    assert _grouprank("--version").stdout.startswith("grouprank-jax ")


def test_an_unexpected_failure_exits_1_and_shows_the_traceback_only_with_v(tmp_path):
    """A tokenizer directory whose tokenizer.json is truncated: transformers raises inside its own
    code, which the policy does not classify as the user's input error. (A truncated safetensors
    shard, the example before, is now a named input error: tests/weights/test_convert_cli.py.)"""
    from grouprank_jax.tokenizer import load_tokenizer, save_tokenizer

    from hf_utils import make_hf_model

    make_hf_model(tmp_path / "hf")
    tokenizer = save_tokenizer(load_tokenizer(), tmp_path / "tok")
    (tokenizer / "tokenizer.json").write_bytes((tokenizer / "tokenizer.json").read_bytes()[:100])
    args = ("export-hf", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "out", "--tokenizer", tokenizer)
    quiet = _grouprank(*args)
    assert quiet.returncode == 1, quiet.stderr[-2000:]
    assert "Traceback" not in quiet.stderr and "run with -v for the traceback" in quiet.stderr
    assert "grouprank export-hf: unexpected" in quiet.stderr
    loud = _grouprank("-v", *args)
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_counts_below_one_are_refused_with_the_flag(tmp_path):
    for args, flag in (
        (
            ("generate", "--model", tmp_path, "--prompts", tmp_path, "--out", tmp_path / "o", "--batch-size", "0"),
            "--batch-size",
        ),
        (("retrieve", "--data", tmp_path, "--out", tmp_path / "run", "--top-k", "0"), "--top-k"),
    ):
        out = _grouprank(*args)
        assert out.returncode == 2 and f"argument {flag}: must be >= 1, got 0" in out.stderr, out.stderr[-2000:]
