"""A second server, with an API key: 401 without or with a wrong key; SIGTERM while requests are
in flight lets them finish and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from serve_client import Server, make_tiny_model

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("serve_model2") / "tiny")
    srv = Server(
        model,
        tmp_path_factory.mktemp("serve_log2") / "server.log",
        extra={"--api-key-env": "GROUPRANK_TEST_KEY"},
        env={"GROUPRANK_TEST_KEY": KEY},
    )
    yield srv
    srv.stop()


def _chat(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, **kw}


def test_api_key_is_required_when_configured(keyed_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path, body in (("POST", "/v1/chat/completions", _chat()), ("GET", "/v1/models", None)):
            status, out = keyed_server.request(method, path, body, headers=headers)
            assert status == 401, (headers, path, out)
            assert out["error"]["type"] == "authentication_error" and out["error"]["code"] == "invalid_api_key"
    assert keyed_server.get("/health")[0] == 200  # probes need no key
    ok = {"Authorization": f"Bearer {KEY}"}
    assert keyed_server.post("/v1/chat/completions", _chat(), headers=ok)[0] == 200
    assert keyed_server.get("/v1/models", headers=ok)[0] == 200


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(keyed_server):
    ok = {"Authorization": f"Bearer {KEY}"}
    results = [None] * 4

    def client(i):
        # 8 rows: a batch shape not compiled yet keeps the requests in flight for seconds.
        body = _chat(max_tokens=16, seed=i, n=2)
        results[i] = keyed_server.post("/v1/chat/completions", body, headers=ok)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while keyed_server.metrics()["grouprank_queue_depth"] < 8:  # all 4 requests are queued or running
        assert time.monotonic() < deadline
        time.sleep(0.02)
    keyed_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert keyed_server.proc.wait(60) == 0, keyed_server.log_path.read_text()
    for status, out in results:
        assert status == 200, out
        assert len(out["choices"]) == 2 and out["usage"]["completion_tokens"] > 0
