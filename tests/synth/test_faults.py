"""Faults: the HTTP teacher answers 500 and garbage for a fraction of calls, and the synth process
is killed (SIGKILL) mid-run and restarted. The final outputs equal an uninterrupted run's, and no
request answered before the kill is answered again after the restart, except those in flight."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grouprank_jax.cli import main

from synth_helpers import dl19, read_manifest, subset, teacher_args  # noqa: F401 (dl19: a fixture)
from teacher_server import TeacherServer

REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 4
OUTPUTS = ("sft.jsonl", "rl.jsonl", "audit.jsonl")


def _cache_keys(out: Path) -> list[str]:
    path = out / "cache" / "teachers.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["key"] for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]


def test_500s_garbage_and_kill_9_then_restart_equal_an_uninterrupted_run(tmp_path, dl19):  # noqa: F811 (the fixture)
    data = subset(dl19, tmp_path / "dl19_6q.json", 6)
    options = ["--pool-top", "6", "--pool-random", "10", "--concurrency", str(CONCURRENCY), "--max-retries", "4"]
    server = TeacherServer(
        dl19["queries"], dl19["texts"], dl19["qrels"], error_rate=0.2, garbage_rate=0.2, delay=0.02, seed=1
    )
    with server:
        args = lambda out: ["synth", "--data", str(data), "--out", str(out), *teacher_args(server.url), *options]
        reference = tmp_path / "straight"
        assert main(args(reference)) == 0
        straight = read_manifest(reference)
        assert server.errors > 0 and server.garbage > 0  # the faults really happened
        assert straight["totals"]["http_retries"] > 0 and straight["totals"]["format_retries"] > 0

        out = tmp_path / "killed"
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
        cmd = [sys.executable, "-m", "grouprank_jax.cli", *args(out)]
        start_log = len(server.log)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 300  # a hang guard, not a speed claim
            while len(_cache_keys(out)) < 30:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.time() < deadline, "the synth process made no progress"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        time.sleep(0.5)  # let requests the dead client left in flight finish on the server
        before = {key for _, key in server.log[start_log:]}
        cached = set(_cache_keys(out))
        assert not (out / "manifest.json").exists() and len(cached) < straight["totals"]["calls"]  # killed mid-run

        restart_log = len(server.log)
        assert main(args(out)) == 0
        after = [key for _, key in server.log[restart_log:]]

    assert not cached & set(after)  # nothing the cache holds was asked again
    in_flight = before - cached  # answered by the server, never received by the killed client
    assert set(after) & before <= in_flight and len(in_flight) <= CONCURRENCY
    assert len(after) == len(set(after))  # no request twice within the restarted run either
    resumed = read_manifest(out)
    assert resumed["totals"]["cached"] == len(cached)
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_api_key_from_the_environment_and_a_refusing_teacher_is_one_line(tmp_path, dl19, monkeypatch, capsys):  # noqa: F811
    data = subset(dl19, tmp_path / "dl19_1q.json", 1)
    secret = "sk-test-do-not-log-1234"
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"], api_key=secret) as server:
        args = ["synth", "--data", str(data), *teacher_args(server.url), "--pool-top", "3", "--pool-random", "2"]
        args += ["--api-key-env", "SYNTH_TEST_KEY"]
        monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)
        assert main([*args, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("grouprank synth: error:")]
        assert "HTTP 401" in line and server.url in line
        monkeypatch.setenv("SYNTH_TEST_KEY", secret)
        assert main([*args, "--out", str(tmp_path / "ok")]) == 0
        assert len(server.log) == 5 + 1
    written = "".join(p.read_text() for p in (tmp_path / "ok").rglob("*") if p.is_file())
    assert secret not in written and secret not in capsys.readouterr().err
    assert main(["synth", "--data", str(data), "--out", str(tmp_path / "x"), "--pointwise-model", "m"]) == 2
    assert "give the listwise teacher" in capsys.readouterr().err
    # Mistakes found before any teacher call: a URL without its scheme (it was retried for ~40 s
    # as a transient failure), a --qrels file that is not there (read only after every call).
    bare = ["--pointwise-url", "127.0.0.1:9/v1", "--pointwise-model", "m"]
    bare += ["--listwise-url", "http://127.0.0.1:9/v1", "--listwise-model", "m"]
    assert main(["synth", "--data", str(data), "--out", str(tmp_path / "y"), *bare]) == 2
    assert "--pointwise-url 127.0.0.1:9/v1: give the scheme, e.g. http://127.0.0.1:9/v1" in capsys.readouterr().err
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"]) as server:
        args = ["synth", "--data", str(data), *teacher_args(server.url), "--qrels", str(tmp_path / "none.qrels")]
        assert main([*args, "--out", str(tmp_path / "z")]) == 2
        assert "none.qrels" in capsys.readouterr().err and not server.log


def test_a_request_the_teacher_refuses_is_missing_and_the_run_goes_on(tmp_path, dl19, capsys):  # noqa: F811
    """A 400 for one request (vLLM's answer to a prompt over its context) used to stop the run, and
    every rerun stopped at the same request. Now that item is missing, the run finishes, and the
    refused request is not cached (a rerun asks again). A teacher that refuses everything still
    stops the run with one line, after ``REFUSAL_LIMIT`` refusals when nothing was ever answered."""
    from grouprank_jax.synth.client import REFUSAL_LIMIT

    data = subset(dl19, tmp_path / "dl19_2q.json", 2)
    entry = dl19["entries"][0]
    options = ["--pool-top", "3", "--pool-random", "2", "--max-retries", "1", "--concurrency", "1"]
    refuse = frozenset({str(entry.hits[0]["docid"])})  # in query 0's pool (ranks 1-3)
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"], refuse_pointwise=refuse) as server:
        args = ["synth", "--data", str(data), *teacher_args(server.url), *options]
        assert main([*args, "--out", str(tmp_path / "some")]) == 0
        manifest = read_manifest(tmp_path / "some")
        assert server.refused == 2  # the request and its one re-ask
        assert manifest["teachers"]["pointwise"]["stats"]["refused"] == 2
        assert manifest["failures"]["pointwise_missing"] == [[entry.qid, str(entry.hits[0]["docid"])]]
        assert manifest["counts"]["pointwise"]["missing"] == 1
        assert main([*args, "--out", str(tmp_path / "some")]) == 0
        assert server.refused == 4  # not cached: asked again

    everything = frozenset(dl19["texts"])
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"], refuse_pointwise=everything) as server:
        args = ["synth", "--data", str(data), *teacher_args(server.url), *options]
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / "none")]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("grouprank synth: error:")]
        assert f"refused its first {REFUSAL_LIMIT} requests and answered none" in line
        assert "maximum context length" in line and server.url in line
        assert server.refused == REFUSAL_LIMIT  # of the 10 pointwise requests
        one_query = subset(dl19, tmp_path / "dl19_1q.json", 1)
        args = ["synth", "--data", str(one_query), *teacher_args(server.url), *options]
        assert main([*args, "--out", str(tmp_path / "none1")]) == 2
        assert "refused every request (5)" in capsys.readouterr().err


def test_sliding_window_beyond_the_listwise_window_is_rank_llms(tmp_path, dl19):  # noqa: F811
    """Pools larger than --listwise-window go through windows of 20, stride 10, bottom-up, over the
    pointwise order; with a teacher that sorts each window by a fixed key, the result is exactly
    the windows applied one after the other."""
    from grouprank_jax.synth.stages import sliding_windows

    from teacher_server import _gauss

    data = subset(dl19, tmp_path / "dl19_2q.json", 2)
    out = tmp_path / "windows"
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"], defect_rate=0.0) as server:
        args = ["synth", "--data", str(data), "--out", str(out), *teacher_args(server.url)]
        assert main([*args, "--pool-top", "10", "--pool-random", "25", "--listwise-window", "30"]) == 0
    manifest = read_manifest(out)
    assert manifest["counts"]["listwise"]["items"] == 2 * 3  # 35 documents: windows 15-35, 5-25, 0-15
    assert sliding_windows(35, 20, 10) == [(15, 35), (5, 25), (0, 15)]
    for line in (out / "audit.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = {
            d: server.grade(row["qid"], d) + server.listwise_noise * _gauss(row["qid"], d, "listwise")
            for d in row["pool"]
        }
        first = {d: r for r, d in enumerate(row["pool"])}
        order = sorted(row["pool"], key=lambda d: (-(row["pointwise"][d]), first[d]))  # the pointwise order
        for start, end in sliding_windows(len(order), 20, 10):
            order[start:end] = sorted(order[start:end], key=lambda d: -key[d])
        assert row["listwise"] == order
