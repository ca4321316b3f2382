"""A real ``grouprank serve`` subprocess on 127.0.0.1 (free port) and a urllib client for it.

Server settings are small so tests/serve runs in about a minute on two CPU cores: greedy rerank,
16 new tokens, a 256-token prompt budget, groups of 2 documents with the compact prompt.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import REPO

SERVER_FLAGS = {
    "--served-model-name": "tiny",
    "--max-batch": "8",
    "--max-wait-ms": "50",
    "--max-queue": "40",
    "--max-body-bytes": "65536",
    "--max-prompt-len": "256",
    "--max-new-tokens": "16",
    "--max-n": "8",
    "--max-documents": "100",
    "--prompt": "compact",
    "--group-size": "2",
    "--max-doc-chars": "3000",
    "--temperature": "0",
    "--seed": "7",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, log_path: Path, extra: dict[str, str] | None = None, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = {**SERVER_FLAGS, **(extra or {})}
        cmd = [sys.executable, "-m", "grouprank_jax.cli", "serve", "--model", str(model_dir), "--port", str(self.port)]
        for key, value in flags.items():
            cmd += [key, value]
        self.log_path = log_path
        full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **(env or {}))
        self.proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{log_path.read_text()}")

    def request(self, method: str, path: str, body=None, headers=None, timeout=120) -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, kind = resp.status, resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            status, raw, kind = err.code, err.read(), err.headers.get("content-type", "")
        return status, (json.loads(raw) if "json" in kind else raw.decode())

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw):
        return self.request("POST", path, body, **kw)

    def parallel(self, path: str, bodies: list, **kw) -> list:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda b: self.post(path, b, **kw), bodies))

    def metrics(self) -> dict[str, float]:
        from grouprank_jax.serve.metrics import parse_prometheus

        status, text = self.get("/metrics")
        assert status == 200
        return parse_prometheus(text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def make_tiny_model(path: Path) -> Path:
    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model
    from grouprank_jax.weights import save_hf

    save_hf(create_model(model_preset("tiny"), seed=0), path)
    return path
