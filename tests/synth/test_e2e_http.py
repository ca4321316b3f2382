"""``grouprank synth`` end to end on the shipped DL19 data against a real HTTP teacher on
127.0.0.1 (tests/synth/teacher_server.py, answers = qrels + noise): the fused labels agree with
the qrels better than either teacher alone, a rerun makes no teacher call, and the outputs train
one step of ``grouprank sft`` and ``grouprank grpo`` on the tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from grouprank_jax.cli import main
from grouprank_jax.data.records import iter_records

from synth_helpers import dl19, read_manifest, teacher_args  # noqa: F401 (dl19: a fixture)
from teacher_server import TeacherServer

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("sft.jsonl", "rl.jsonl", "audit.jsonl")


def _synth(data, url, out, *extra):
    args = ["synth", "--data", str(data["data"]), "--out", str(out), "--qrels", str(data["qrels_path"])]
    return main(args + teacher_args(url) + ["--pool-random", "20", *extra])


def test_fused_labels_beat_each_teacher_then_rerun_is_free_and_outputs_train(tmp_path, dl19):  # noqa: F811 (the fixture)
    out = tmp_path / "synth"
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"]) as server:
        assert _synth(dl19, server.url, out) == 0
        answered = len(server.log)
        first = {name: (out / name).read_bytes() for name in OUTPUTS}
        manifest = read_manifest(out)
        trainers = _start_training(tmp_path, out)  # they run while the checks below do
        try:
            assert _synth(dl19, server.url, out) == 0  # the same command again
            assert len(server.log) == answered  # not one request reached the teacher
            again = read_manifest(out)
            assert again["totals"]["calls"] == 0 and again["totals"]["cached"] == manifest["totals"]["calls"]
            assert {name: (out / name).read_bytes() for name in OUTPUTS} == first
            _check_outputs(out, manifest, answered)
            _finish_training(tmp_path, trainers)
        finally:
            for proc in trainers.values():
                if proc.poll() is None:
                    proc.kill()


def _check_outputs(out, manifest, answered):
    counts, totals, quality = manifest["counts"], manifest["totals"], manifest["quality"]
    assert counts["queries"] == 43 and counts["pool_documents"] == 43 * 30
    assert totals["calls"] == answered == 43 * 30 + 43  # one pointwise call per document, one listwise per query
    assert totals["missing"] == 0 and counts["listwise"]["repaired"] > 0  # the server's defective arrays
    ndcg = {name: quality[name]["ndcg_cut_10"] for name in quality}
    assert ndcg["fused"] > ndcg["pointwise"] and ndcg["fused"] > ndcg["listwise"], ndcg
    assert ndcg["pointwise"] > ndcg["first_stage"] and ndcg["listwise"] > ndcg["first_stage"], ndcg

    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 43 and set(audit[0]) == {"qid", "pool", "pointwise", "listwise", "fused"}
    for row in audit:
        assert sorted(row["fused"]) == sorted(row["listwise"]) == sorted(row["pool"]) == sorted(row["pointwise"])

    sft = list(iter_records([out / "sft.jsonl"], purpose="sft"))
    rl = list(iter_records([out / "rl.jsonl"], purpose="rl"))
    assert len(sft) == 2 * 43 and len(rl) == 43
    for record, raw in zip(rl, (json.loads(x) for x in (out / "rl.jsonl").read_text().splitlines())):
        by_fused = sorted(range(len(raw["fused_rank"])), key=lambda i: raw["fused_rank"][i])
        assert [record["gold"][i] for i in by_fused] == sorted(record["gold"], reverse=True)  # gold follows fusion
        assert sorted(record["gold"]) == sorted(record["scores"])  # with the teacher's scores


def _start_training(tmp_path, out) -> dict[str, subprocess.Popen]:
    """One step of each real command, as single-device processes side by side."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = {}
    for stage, key, name in (("sft", "sft_train", "sft.jsonl"), ("grpo", "rl_train", "rl.jsonl")):
        data = shutil.copy(out / name, tmp_path / f"train_{name}")
        cfg = _train_config(tmp_path / f"{stage}_run", stage)
        cfg["data"] = {key: [str(data)]}
        config = tmp_path / f"{stage}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "grouprank_jax.cli", stage, "--config", str(config), "--max-steps", "1"]
        procs[stage] = subprocess.Popen(
            cmd + ["--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return procs


def _finish_training(tmp_path, procs) -> None:
    for stage, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"{stage}: finished at step 1" in stdout
        metrics = (tmp_path / f"{stage}_run" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in metrics] == [1]


def _train_config(run_dir, stage: str) -> dict:
    cfg = {
        "model": {"preset": "tiny", "num_layers": 1},  # one layer: half the compile time
        "prompt": {"preset": "compact", "max_doc_chars": 20},
        "checkpoint": {"save_every": 10_000, "keep": 1, "async_save": False},
        "run_dir": str(run_dir),
    }
    if stage == "sft":
        cfg["sft"] = {
            "learning_rate": 1e-3,
            "per_device_batch": 1,
            "grad_accum_steps": 1,
            "max_seq_len": 512,
            "length_buckets": [512],
            "packing": False,
            "total_steps": 1,
            "truncation": "left",  # synth's 20-document groups exceed this cheap run's 512 tokens
        }
    else:
        cfg["grpo"] = {
            "rollouts_per_prompt": 2,
            "global_batch_prompts": 1,
            "mini_batch_prompts": 1,
            "max_prompt_len": 256,
            "max_response_len": 8,
            "group_sampling": "redraw",  # synth's groups hold up to 20 documents; 3-5 keep this cheap
            "group_size_min": 3,
            "group_size_max": 5,
            "lora_rank": 4,
            "lora_alpha": 8.0,
            "kl_coef": 0.0,
        }
    return cfg
