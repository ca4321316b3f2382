"""``grouprank serve`` under load: rerank requests/s and latency at several client concurrencies.

    grouprank bench serve --out benchmarks/cpu_serve.json               # tiny random model, CPU
    grouprank bench serve --model export/grpo_7b --concurrency 1,8,32   # a real model on an accelerator

Starts a real server process (``--max-batch``, ``--max-wait-ms`` as given; greedy), then sends
``--requests`` rerank requests (each: its own query and ``--documents`` documents of ``--words``
words, one group when ``--group-size`` >= documents) from C concurrent clients over HTTP, for
each C of ``--concurrency``. C = 1 is the sequential baseline: the same requests one after
another. Every level runs once untimed first (it compiles the batch shapes it will hit), then
timed. Per level: requests/s, p50/p95 latency, mean generations per ``generate`` call (from
``/metrics``) and the speedup over C = 1. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from grouprank_jax.serve.metrics import parse_prometheus

WORDS = (
    "tide moon ocean sun gravity wave bread market walnut spring river delta coast orbit pull water "
    "bulge high low cycle season storm wind current shore sand rock cliff harbor ship sail"
).split()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="served model (default: a tiny random-weight model, written to a temp dir)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (1 = sequential)")
    p.add_argument("--requests", type=int, default=32, help="rerank requests per level")
    p.add_argument("--documents", type=int, default=20)
    p.add_argument("--words", type=int, default=100, help="words per document")
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=3072)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--prompt", default="compact")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def _tiny_model(tmp: Path) -> Path:
    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model
    from grouprank_jax.weights import save_hf

    save_hf(create_model(model_preset("tiny"), seed=0), tmp / "tiny")
    return tmp / "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> float:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as resp:
        json.load(resp)
    return time.perf_counter() - start


def _metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=60) as resp:
        return parse_prometheus(resp.read().decode())


def _requests(args) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "query": " ".join(rng.choices(WORDS, k=6)),
            "documents": [" ".join(rng.choices(WORDS, k=args.words)) for _ in range(args.documents)],
        }
        for _ in range(args.requests)
    ]


def _level(base: str, bodies: list[dict], clients: int) -> dict:
    before = _metrics(base)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda b: _post(base + "/v1/rerank", b), bodies))
    wall = time.perf_counter() - start
    after = _metrics(base)
    batches = after["grouprank_batch_size_count"] - before["grouprank_batch_size_count"]
    rows = after["grouprank_batch_size_sum"] - before["grouprank_batch_size_sum"]
    return {
        "clients": clients,
        "requests": len(bodies),
        "requests_per_s": len(bodies) / wall,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "mean_batch": rows / max(batches, 1),
        "wall_s": wall,
    }


def run_bench(args) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="grouprank_bench_serve_"))
    model = args.model or str(_tiny_model(tmp))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    flags = {
        "--port": port,
        "--max-batch": args.max_batch,
        "--max-wait-ms": args.max_wait_ms,
        "--max-queue": max(256, args.max_batch * 4),
        "--max-prompt-len": args.max_prompt_len,
        "--max-new-tokens": args.max_new_tokens,
        "--group-size": args.group_size,
        "--prompt": args.prompt,
        "--temperature": 0,
    }
    cmd = [sys.executable, "-m", "grouprank_jax.cli", "serve", "--model", model]
    cmd += [str(x) for kv in flags.items() for x in kv]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {tmp / 'server.log'}")
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        bodies = _requests(args)
        rows = []
        for clients in (int(c) for c in args.concurrency.split(",")):
            _level(base, bodies, clients)  # untimed: compiles this level's batch shapes
            rows.append(_level(base, bodies, clients))
            print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()
    sequential = next((r["requests_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["speedup_vs_sequential"] = r["requests_per_s"] / sequential if sequential else None
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    rows = run_bench(args)
    keys = ["clients", "requests", "requests_per_s", "p50_s", "p95_s", "mean_batch", "speedup_vs_sequential"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
