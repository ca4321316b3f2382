"""Exact resume: GRPO and SFT runs killed with SIGKILL after their 3rd checkpoint and resumed to
step 6 end bit-identical to uninterrupted 6-step runs, and the resumed runs really restored
(they start at latest + 1); SIGTERM to the real ``grouprank sft|grpo`` commands saves, exits 0
and resumes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from grouprank_jax.config.run import run_config_from_dict
from grouprank_jax.data.records import records_from_rows

ROWS = [
    {
        "query": f"topic{i % 3}",
        "documents": [f"passage {j} on topic{j % 3}" for j in range(6)],
        "gold": [10 if j % 3 == i % 3 else 0 for j in range(6)],
    }
    for i in range(24)
]


def _grpo_cfg(run_dir):
    return {
        "model": {"preset": "tiny"},
        "prompt": {"preset": "compact"},
        "grpo": {
            "rollouts_per_prompt": 2,
            "global_batch_prompts": 2,
            "mini_batch_prompts": 2,
            "max_prompt_len": 256,
            "max_response_len": 8,
            "group_sampling": "redraw",  # a per-step random draw must resume identically
            "group_size_min": 3,
            "group_size_max": 5,
            "lora_enabled": False,
            "learning_rate": 1e-3,
            "temperature": 1.0,
        },
        "checkpoint": {"save_every": 1, "keep": 10, "async_save": False},
        "run_dir": str(run_dir),
    }


def _leaves(model):
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


SCRIPT = textwrap.dedent("""
    import json, sys
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.rl.trainer import train_grpo
    from grouprank_jax.config.run import run_config_from_dict
    cfg = run_config_from_dict(json.loads(sys.argv[1]))
    rows = json.loads(sys.argv[2])
    train_grpo(cfg, records=records_from_rows(rows, purpose="rl"), max_steps=6, progress=False)
""")


def test_grpo_sigkill_then_resume_is_bit_identical(tmp_path):
    from grouprank_jax.checkpoint import Checkpointer
    from grouprank_jax.rl.trainer import train_grpo

    records = records_from_rows(ROWS, purpose="rl")
    straight = train_grpo(
        run_config_from_dict(_grpo_cfg(tmp_path / "straight")), records=records, max_steps=6, progress=False
    )

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(_grpo_cfg(killed_dir)), json.dumps(ROWS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 600  # a hang guard, not a speed claim
    try:
        while not (killed_dir / "checkpoints" / "3").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no step-3 checkpoint within 600 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Checkpointer(killed_dir / "checkpoints", async_save=False) as ckpt:
        latest = ckpt.latest_step()
    assert latest is not None and 3 <= latest < 6, f"killed run reached step {latest}"

    resumed = train_grpo(run_config_from_dict(_grpo_cfg(killed_dir)), records=records, max_steps=6, progress=False)
    assert resumed.step == 6 and resumed.metrics[0]["step"] == latest + 1
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model)):
        np.testing.assert_array_equal(a, b)
    # the resumed steps saw exactly the rollouts of the uninterrupted run
    for m in resumed.metrics:
        ref = straight.metrics[m["step"] - 1]
        assert m["grpo/reward_mean"] == ref["grpo/reward_mean"]


SFT_ROWS = [
    {"query": f"q{i}", "documents": ["alpha beta", "gamma delta", "epsilon"], "scores": [i % 11, 3, 0]}
    for i in range(16)
]


def _sft_cfg(run_dir):
    return {
        "model": {"preset": "tiny"},
        "prompt": {"preset": "compact"},
        "sft": {
            "learning_rate": 1e-3,
            "per_device_batch": 1,
            "grad_accum_steps": 2,
            "max_seq_len": 256,
            "length_buckets": [256],
            "packing": False,
            "total_steps": 6,
        },
        "checkpoint": {"save_every": 1, "keep": 10, "async_save": True},
        "run_dir": str(run_dir),
    }


SFT_SCRIPT = textwrap.dedent("""
    import json, sys
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.sft.trainer import train_sft
    from grouprank_jax.config.run import run_config_from_dict
    cfg = run_config_from_dict(json.loads(sys.argv[1]))
    train_sft(cfg, records=records_from_rows(json.loads(sys.argv[2]), purpose="sft"), progress=False)
""")


def _kill_after_checkpoint(script: str, cfg: dict, rows, run_dir, step: int) -> int:
    """Run ``script`` in a subprocess, SIGKILL it once checkpoint ``step`` is finalized, return
    the latest finalized step it left behind."""
    from grouprank_jax.checkpoint import Checkpointer

    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(cfg), json.dumps(rows)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 600  # a hang guard, not a speed claim
    try:
        while not (run_dir / "checkpoints" / str(step)).is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, f"no step-{step} checkpoint within 600 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Checkpointer(run_dir / "checkpoints", async_save=False) as ckpt:
        return ckpt.latest_step()


def test_sft_sigkill_then_resume_is_bit_identical(tmp_path):
    """A restore really happens: the resumed run starts at latest + 1 and runs only the
    remaining steps (a loop that ignored its checkpoints would run 6), and ends bit-identical."""
    from grouprank_jax.sft.trainer import train_sft

    records = records_from_rows(SFT_ROWS, purpose="sft")
    straight = train_sft(run_config_from_dict(_sft_cfg(tmp_path / "a")), records=records, progress=False)
    assert straight.step == 6

    killed_dir = tmp_path / "b"
    latest = _kill_after_checkpoint(SFT_SCRIPT, _sft_cfg(killed_dir), SFT_ROWS, killed_dir, 3)
    assert latest is not None and 3 <= latest < 6, f"killed run reached step {latest}"
    resumed = train_sft(run_config_from_dict(_sft_cfg(killed_dir)), records=records, progress=False)
    assert resumed.step == 6
    assert [m["step"] for m in resumed.metrics] == list(range(latest + 1, 7))
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model)):
        np.testing.assert_array_equal(a, b)
    for m in resumed.metrics:  # the resumed steps saw the same batches
        assert m["sft/loss"] == straight.metrics[m["step"] - 1]["sft/loss"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cli_config(tmp_path, stage: str) -> Path:
    import yaml

    run_dir = tmp_path / f"{stage}_run"
    if stage == "sft":
        cfg = _sft_cfg(run_dir)
        cfg["sft"]["total_steps"] = 10_000
        cfg["data"] = {"sft_train": [_write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)]}
    else:
        cfg = _grpo_cfg(run_dir)
        # 4 prompts x 2 rollouts: rows divide the 8-device batch axes of the command's mesh;
        # a long schedule, as for SFT (--max-steps only caps it)
        cfg["grpo"].update(global_batch_prompts=4, mini_batch_prompts=4, total_steps=10_000)
        cfg["data"] = {"rl_train": [_write_jsonl(tmp_path / "rl.jsonl", ROWS)]}
    cfg["checkpoint"] = {"save_every": 10_000, "keep": 3, "async_save": True}  # only the SIGTERM save
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _signal_after_first_step(tmp_path, stage: str, sig) -> tuple[subprocess.Popen, str, list[str]]:
    """Start a real ``grouprank <stage>``, send ``sig`` once a step is logged, wait for it to exit.
    Returns (process, its stderr, the command line without ``--max-steps``)."""
    config = _cli_config(tmp_path, stage)
    run_dir = tmp_path / f"{stage}_run"
    cmd = [sys.executable, "-m", "grouprank_jax.cli", stage, "--config", str(config), "--no-progress"]
    proc = subprocess.Popen(cmd + ["--max-steps", "10000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # hang guard
    try:
        while not ((run_dir / "metrics.jsonl").exists() and _metric_steps(run_dir)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no training step within 600 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err, cmd


def _saved_step(run_dir):
    from grouprank_jax.checkpoint import Checkpointer

    with Checkpointer(run_dir / "checkpoints", async_save=False) as ckpt:
        return ckpt.latest_step()


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_sigterm_to_the_cli_saves_exits_zero_and_resumes(tmp_path, stage):
    """SIGTERM to a real ``grouprank sft|grpo`` process: it finishes the step, saves a checkpoint
    of exactly that step, exits 0; running the command again continues from there."""
    proc, err, cmd = _signal_after_first_step(tmp_path, stage, signal.SIGTERM)
    run_dir = tmp_path / f"{stage}_run"
    assert proc.returncode == 0, err[-3000:]
    logged = _metric_steps(run_dir)
    saved = _saved_step(run_dir)
    assert saved == logged[-1] and logged == list(range(1, saved + 1)) and saved < 10_000

    again = subprocess.run(cmd + ["--max-steps", str(saved + 2)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _metric_steps(run_dir) == list(range(1, saved + 3))  # resumed at saved + 1, not from step 1
    assert f"finished at step {saved + 2}" in again.stdout
    # A shorter --max-steps shortens the LR schedule: the resume says so.
    assert f"total_steps: 10000 -> {saved + 2}" in again.stderr and "same --max-steps" in again.stderr


def test_ctrl_c_to_the_cli_saves_and_exits_130(tmp_path):
    """SIGINT (Ctrl-C) to a real ``grouprank sft``: the step finishes, a checkpoint of exactly that
    step is written, and the command exits 130 with one line and no traceback."""
    proc, err, _ = _signal_after_first_step(tmp_path, "sft", signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert "grouprank sft: interrupted" in err and "Traceback" not in err, err[-3000:]
    assert _saved_step(tmp_path / "sft_run") == _metric_steps(tmp_path / "sft_run")[-1] < 10_000


def test_check_resume_refuses_another_process_count_and_names_changed_settings(tmp_path, caplog):
    from grouprank_jax.training.loop import check_resume

    saved = {"config": {"seed": 0, "grpo": {"learning_rate": 1e-5, "lora_targets": ["q_proj"]}, "run_dir": "a"}}
    saved.update(total_steps=460, process_count=2)
    same = {**saved, "config": {**saved["config"], "run_dir": "b"}}  # a moved run_dir is no change
    where = tmp_path / "run" / "checkpoints"
    with caplog.at_level("WARNING"):
        check_resume(
            saved,
            {**same, "config": {**same["config"], "grpo": {"learning_rate": 1e-5, "lora_targets": ("q_proj",)}}},
            where,
            7,
        )
    assert not caplog.records
    with pytest.raises(ValueError, match=r"saved by 2 processes, this run has 1.*resume with 2 processes"):
        check_resume(saved, {**same, "process_count": 1}, where, 7)
    changed = {**same, "total_steps": 10, "config": {**same["config"], "seed": 1, "grpo": {"learning_rate": 2e-5}}}
    with caplog.at_level("WARNING"):
        check_resume(saved, changed, where, 7)
    (message,) = [r.getMessage() for r in caplog.records]
    assert (
        "resuming step 7" in message and "seed: 0 -> 1" in message and "grpo.learning_rate: 1e-05 -> 2e-05" in message
    )
    assert "grpo.lora_targets: ['q_proj'] -> None" in message and "total_steps: 460 -> 10" in message
    check_resume(None, changed, where, 7)  # checkpoints from before this metadata: nothing to compare
    # The data position is counted in batches: another per-process batch (e.g. SFT on another
    # device count with the same fsdp: -1 config) would skip or repeat records.
    with pytest.raises(ValueError, match=r"data batch of 4 per process per step, this run's is 8"):
        check_resume({**saved, "data_batch": 4}, {**same, "data_batch": 8}, where, 7)
    check_resume({**saved, "data_batch": 4}, {**same, "data_batch": 4}, where, 7)


def test_a_run_dir_of_another_model_is_refused_before_its_model_config_is_touched(tmp_path):
    """A resume with another LoRA rank (or shape) used to rewrite ``model_config.json`` before
    the restore failed, after which export, rerank and init_from could not load the run."""
    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model
    from grouprank_jax.training.run_dir import RunDir, save_base_weights

    run = RunDir(tmp_path / "run")
    model = create_model(model_preset("tiny").replace(lora_rank=4), seed=0)
    save_base_weights(model, run)
    written = (run.root / "model_config.json").read_text()
    save_base_weights(create_model(model_preset("tiny").replace(lora_rank=8), seed=0), run)  # no checkpoint yet
    (run.checkpoints / "2").mkdir(parents=True)
    save_base_weights(create_model(model_preset("tiny").replace(lora_rank=8, remat="full"), seed=0), run)
    (run.root / "model_config.json").write_text(written)
    with pytest.raises(ValueError, match=r"holds checkpoints of another model \(lora_rank: 4 -> 8\)"):
        save_base_weights(create_model(model_preset("tiny").replace(lora_rank=8), seed=0), run)
    assert (run.root / "model_config.json").read_text() == written
    save_base_weights(create_model(model_preset("tiny").replace(lora_rank=4, remat="full"), seed=0), run)


def test_full_fine_tuning_grpo_resumes_against_the_kl_reference_it_started_with(tmp_path):
    """Full fine-tuning GRPO (KL on) stopped after step 1, its ``init_from`` HF directory then
    overwritten with other weights (a re-conversion, a moved symlink), resumed to step 2: the
    result equals an uninterrupted 2-step run, because the reference comes from the run dir's
    ``base/params`` written at the first start, not from ``init_from`` again."""
    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model
    from grouprank_jax.rl.trainer import train_grpo
    from grouprank_jax.weights import save_hf

    init = tmp_path / "init_hf"
    save_hf(create_model(model_preset("tiny"), seed=1), init)
    records = records_from_rows(ROWS, purpose="rl")

    def cfg(name):
        tree = _grpo_cfg(tmp_path / name)
        tree["grpo"]["kl_coef"] = 0.5  # a reference that moves the update visibly
        return run_config_from_dict({**tree, "init_from": str(init), "checkpoint": {**tree["checkpoint"], "keep": 2}})

    straight = train_grpo(cfg("straight"), records=records, max_steps=2, progress=False)
    train_grpo(cfg("resumed"), records=records, max_steps=2, stop_after=1, progress=False)
    assert (tmp_path / "resumed" / "base" / "params").is_dir()
    save_hf(create_model(model_preset("tiny"), seed=2), init)  # init_from now holds other weights
    resumed = train_grpo(cfg("resumed"), records=records, max_steps=2, progress=False)
    assert resumed.step == 2 and resumed.metrics[0]["step"] == 2
    assert resumed.metrics[0]["grpo/kl"] == straight.metrics[1]["grpo/kl"]
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model)):
        np.testing.assert_array_equal(a, b)
