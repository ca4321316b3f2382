"""PreemptionGuard: SIGTERM sets a flag (no exit), handlers are restored, a loop saves and exits 0."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from grouprank_jax.preemption import PreemptionGuard

from conftest import REPO


def test_sigterm_sets_flag_without_exiting_and_handler_is_restored():
    sentinel_calls = []

    def previous(signum, frame):
        sentinel_calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionGuard() as guard:
            assert not guard.should_stop
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # let the interpreter run the handler
            assert guard.signalled and guard.should_stop and guard.received == signal.SIGTERM
            assert guard.should_stop  # latched
        assert signal.getsignal(signal.SIGTERM) is previous
        assert sentinel_calls == []  # our guard swallowed it, the old handler never ran
    finally:
        signal.signal(signal.SIGTERM, old)


def test_request_stop_and_bad_sync_every():
    with PreemptionGuard() as guard:
        guard.request_stop()
        assert guard.should_stop
    with pytest.raises(ValueError, match="sync_every"):
        PreemptionGuard(sync_every=0)


_LOOP = textwrap.dedent("""
    import sys, time
    import numpy as np
    from grouprank_jax.checkpoint import Checkpointer
    from grouprank_jax.preemption import PreemptionGuard

    ckpt_dir, ready = sys.argv[1], sys.argv[2]
    ckpt = Checkpointer(ckpt_dir, save_every=10_000, async_save=True)
    state = {"w": np.zeros(4, np.float32), "step": np.asarray(0)}
    with PreemptionGuard() as guard:
        for step in range(1, 100_000):
            state = {"w": state["w"] + 1, "step": np.asarray(step)}
            time.sleep(0.02)  # the "train step"
            ckpt.save(step, state)
            if step == 1:
                open(ready, "w").close()
            if guard.should_stop:
                ckpt.save(step, state, force=True, metadata={"stopped_at": step})
                break
    ckpt.close()
    print("stopped at", step)
""")


def test_subprocess_saves_and_exits_zero_on_sigterm(tmp_path):
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(tmp_path / "ckpt"), str(ready)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "training loop never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    stopped = int(out.split("stopped at")[-1])
    steps = [int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()]
    assert steps == [stopped]
    from grouprank_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        restored = ckpt.restore()
    assert restored.step == stopped and restored.metadata == {"stopped_at": stopped}
    assert int(restored.state["step"]) == stopped and restored.state["w"][0] == stopped


_MULTI = textwrap.dedent("""
    import os, signal, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    pid, port, ckpt_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from grouprank_jax.checkpoint import Checkpointer
    from grouprank_jax.preemption import PreemptionGuard

    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    sharding = NamedSharding(mesh, P("fsdp"))
    ckpt = Checkpointer(ckpt_dir, save_every=1000, async_save=False)
    with PreemptionGuard() as guard:
        for step in range(1, 50):
            w = jax.make_array_from_callback((8,), sharding, lambda i: np.full(
                np.arange(8)[i].shape, step, np.float32))
            if pid == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # only one process is preempted
            if guard.should_stop:
                ckpt.save(step, {"w": w, "step": np.asarray(step)}, force=True)
                break
    ckpt.close()
    print("stopped at", step, "signalled", guard.signalled, flush=True)
""")


def test_two_processes_stop_at_the_same_step(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MULTI, str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "stopped at 3 signalled False" in outs[0][0]
    assert "stopped at 3 signalled True" in outs[1][0]
    assert [p.name for p in tmp_path.iterdir() if p.name.isdigit()] == ["3"]
