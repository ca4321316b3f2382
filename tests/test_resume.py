"""Exact resume: a GRPO run killed with SIGKILL after its 3rd checkpoint and resumed to step 6
ends with parameters bit-identical to an uninterrupted 6-step run; SFT likewise across a stop."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np

from grouprank_jax.data.records import records_from_rows
from grouprank_jax.run_config import run_config_from_dict

ROWS = [
    {"query": f"topic{i % 3}", "documents": [f"passage {j} on topic{j % 3}" for j in range(6)],
     "gold": [10 if j % 3 == i % 3 else 0 for j in range(6)]}
    for i in range(24)
]


def _grpo_cfg(run_dir):
    return {
        "model": {"preset": "tiny"},
        "sft": {"prompt_preset": "compact"},
        "grpo": {"rollouts_per_prompt": 2, "global_batch_prompts": 2, "mini_batch_prompts": 2, "max_prompt_len": 256,
                 "max_response_len": 8, "group_size_min": 3, "group_size_max": 5, "lora_enabled": False,
                 "learning_rate": 1e-3, "temperature": 1.0},
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
    from grouprank_jax.run_config import run_config_from_dict
    cfg = run_config_from_dict(json.loads(sys.argv[1]))
    rows = json.loads(sys.argv[2])
    train_grpo(cfg, records=records_from_rows(rows, purpose="rl"), max_steps=6, progress=False)
""")


def test_grpo_sigkill_then_resume_is_bit_identical(tmp_path):
    from grouprank_jax.checkpoint import Checkpointer
    from grouprank_jax.rl.trainer import train_grpo

    records = records_from_rows(ROWS, purpose="rl")
    straight = train_grpo(run_config_from_dict(_grpo_cfg(tmp_path / "straight")), records=records, max_steps=6, progress=False)

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(_grpo_cfg(killed_dir)), json.dumps(ROWS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not (killed_dir / "checkpoints" / "3").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no step-3 checkpoint within 240 s"
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


def test_sft_stop_then_resume_is_bit_identical(tmp_path):
    from grouprank_jax.sft.trainer import train_sft

    rows = [{"query": f"q{i}", "documents": ["alpha beta", "gamma delta", "epsilon"], "scores": [i % 11, 3, 0]}
            for i in range(16)]
    records = records_from_rows(rows, purpose="sft")

    def cfg(run_dir):
        return run_config_from_dict({
            "model": {"preset": "tiny"},
            "sft": {"learning_rate": 1e-3, "per_device_batch": 1, "grad_accum_steps": 2, "max_seq_len": 256,
                    "length_buckets": [256], "packing": False, "prompt_preset": "compact", "total_steps": 6},
            "checkpoint": {"save_every": 1, "async_save": True},
            "run_dir": str(run_dir),
        })

    straight = train_sft(cfg(tmp_path / "a"), records=records, progress=False)
    first = train_sft(cfg(tmp_path / "b"), records=records, progress=False, stop_after=3)
    assert first.step == 3
    resumed = train_sft(cfg(tmp_path / "b"), records=records, progress=False)
    assert resumed.step == 6
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model)):
        np.testing.assert_array_equal(a, b)
