"""MetricsLogger writes JSONL + TensorBoard events; plot_run / ``grouprank plot`` render a PNG."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.cli import main as cli_main
from grouprank_jax.metrics_log import METRICS_FILE, MetricsLogger, plot_run, read_metrics


def _write_run(run_dir):
    with MetricsLogger(run_dir, enabled=True) as logger:
        for step in range(1, 6):
            logger.log(step, {"sft/loss": jnp.asarray(2.0 / step), "sft/lr": 1e-4, "sft/tokens": np.int64(512 * step)})
        for step in range(6, 11):
            logger.log(
                step,
                {
                    "grpo/reward": jnp.float32(step / 10),
                    "grpo/kl": 0.01 * step,
                    "grpo/ndcg@10": 0.5,
                    "grpo/nan_check": float("nan"),
                    "grpo/clip_frac": jnp.asarray([0.1]),
                },
            )
        logger.log(10, {"eval/ndcg@10": 0.61, "throughput": math.inf})


def test_jsonl_and_tensorboard(tmp_path):
    _write_run(tmp_path)
    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 11
    assert lines[0]["step"] == 1 and isinstance(lines[0]["time"], float)
    assert lines[0]["sft/loss"] == 2.0 and lines[0]["sft/tokens"] == 512
    assert lines[5]["grpo/nan_check"] == "nan" and lines[-1]["throughput"] == "inf"
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    series = read_metrics(tmp_path)
    assert series["sft/loss"][0] == [1, 2, 3, 4, 5]
    assert math.isnan(series["grpo/nan_check"][1][0])
    assert series["grpo/reward"][1][-1] == pytest.approx(1.0)


def test_resume_appends_and_later_step_wins(tmp_path):
    _write_run(tmp_path)
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        logger.log(3, {"sft/loss": 9.0})  # resumed from step 2's checkpoint
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 4, "sft/lo')  # torn last line of a killed process
    steps, values = read_metrics(tmp_path)["sft/loss"]
    assert steps == [1, 2, 3, 4, 5] and values[2] == 9.0


def test_resume_step_drops_later_records_and_a_torn_line(tmp_path):
    """Killed at step 5 mid-write after a checkpoint at 3: the resumed run's steps 4.. are the
    only records of those steps, and its first record is not glued onto the torn line."""
    _write_run(tmp_path)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 11, "grpo/rew')
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=3) as logger:
        for step in (4, 5):
            logger.log(step, {"sft/loss": 10.0 + step})
    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]  # all complete
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    steps, values = read_metrics(tmp_path)["sft/loss"]
    assert steps == [1, 2, 3, 4, 5] and values == pytest.approx([2.0, 1.0, 2.0 / 3, 14.0, 15.0])
    assert "grpo/reward" not in read_metrics(tmp_path)


def test_disabled_writes_nothing_and_bad_values_are_explained(tmp_path):
    MetricsLogger(tmp_path / "off", enabled=False).log(1, {"x": 1.0})
    assert not (tmp_path / "off").exists()
    with MetricsLogger(tmp_path / "on", enabled=True, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="reduce with .mean"):
            logger.log(1, {"x": jnp.ones(3)})
        with pytest.raises(TypeError, match="scalar"):
            logger.log(1, {"x": "high"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1})


def test_plot_png_and_cli(tmp_path, capsys):
    _write_run(tmp_path)
    png = plot_run(tmp_path)
    assert png == tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    small = tmp_path / "small"  # one curve keeps the CLI render cheap
    with MetricsLogger(small, enabled=True, tensorboard=False) as logger:
        for step in range(3):
            logger.log(step, {"loss": 1.0 / (step + 1)})
    out = tmp_path / "plots" / "run.png"
    assert cli_main(["plot", str(small), "--out", str(out)]) == 0
    assert out.stat().st_size > 1_000 and str(out) in capsys.readouterr().out
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_tensorboard_events_are_on_disk_after_every_step(tmp_path):
    """A SIGKILL loses no TensorBoard step the resume will not re-log: each ``log`` flushes (the
    writer used to hold up to 30 s of events in memory)."""
    import struct

    from tensorboardX.proto import event_pb2

    logger = MetricsLogger(tmp_path, enabled=True)
    for step in (1, 2, 3):
        logger.log(step, {"sft/loss": 1.0 / step})
    steps = []  # read the files as a killed process would have left them: no close()
    for path in (tmp_path / "tb").glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            steps += [event.step for v in event.summary.value if v.tag == "sft/loss"]
            i += 12 + n + 4
    assert steps == [1, 2, 3]
    logger.close()
    first = set((tmp_path / "tb").glob("events.out.tfevents.*"))
    with MetricsLogger(tmp_path, enabled=True, resume_step=2) as logger:  # a resume after step 2
        logger.log(3, {"sft/loss": 0.3})
    # a new file, not the first one overwritten (the name's time is in seconds)
    (newest,) = set((tmp_path / "tb").glob("events.out.tfevents.*")) - first
    data = newest.read_bytes()
    event = event_pb2.Event()
    (n,) = struct.unpack("<Q", data[:8])
    event.ParseFromString(data[12 : 12 + n])
    assert event.file_version == "brain.Event:2"
    (n2,) = struct.unpack("<Q", data[12 + n + 4 : 12 + n + 12])
    event.ParseFromString(data[12 + n + 16 : 12 + n + 16 + n2])
    assert event.step == 3 and event.session_log.status == event_pb2.SessionLog.START  # TensorBoard's purge
