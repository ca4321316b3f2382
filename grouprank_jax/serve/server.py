"""``serve(cfg)``: load the model, bind the port, run uvicorn until SIGTERM / SIGINT, exit cleanly.

Order: the engine loads the model first (a bad path fails as a one-line CLI error before any port
is opened), then the socket is bound here (a taken port is a user error, not a uvicorn exit), then
uvicorn serves. On SIGTERM or SIGINT uvicorn stops accepting connections and waits for the
requests in flight; the engine then finishes its queue and the function returns 0. (Stock
uvicorn re-raises the captured signal after a graceful shutdown, so the process would die by
the signal; ``_Server`` only records it.)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

import uvicorn

from grouprank_jax.serve.app import create_app
from grouprank_jax.serve.config import ServeConfig
from grouprank_jax.serve.engine import Engine
from grouprank_jax.serve.metrics import Metrics
from grouprank_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig) -> int:
    cfg.api_key()  # fail now, not at the first request, when the key's variable is unset
    metrics = Metrics()
    engine = Engine(cfg, load_tokenizer(cfg.tokenizer), metrics)
    engine.start()
    try:
        app = create_app(engine, metrics)
        sock = bind(cfg.host, cfg.port)
        server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        log.info(
            "serving %s on http://%s:%d (max batch %d, max wait %g ms, queue %d)",
            cfg.model_name,
            cfg.host,
            sock.getsockname()[1],
            cfg.max_batch,
            cfg.max_wait_ms,
            cfg.max_queue,
        )
        server.run(sockets=[sock])
    finally:
        engine.stop()
    log.info("serve: stopped")
    return 0
