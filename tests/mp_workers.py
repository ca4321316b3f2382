"""Run a worker script as N real JAX processes on localhost (gloo collectives) with 8 CPU
devices in total, and collect the JSON each prints on its ``RESULT `` line."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: str, num_processes: int, *args: str, timeout: float = 120) -> list[dict]:
    """``python -c worker REPO DEVICES_PER_PROCESS *args`` once per process; results in process order."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(
            GROUPRANK_COORDINATOR=f"127.0.0.1:{port}",
            GROUPRANK_NUM_PROCESSES=str(num_processes),
            GROUPRANK_PROCESS_ID=str(i),
            # CI runs these workers beside pytest -n 2 on 2 cores; a process starved of CPU for
            # JAX's default 100 s would otherwise get both workers stopped by the coordinator.
            GROUPRANK_HEARTBEAT_TIMEOUT="600",
        )
        if num_processes == 1:
            env.update(GROUPRANK_NUM_PROCESSES="1", GROUPRANK_COORDINATOR="")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", worker, str(REPO), str(8 // num_processes), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{err[-4000:]}"
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT ") :]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
