"""``grouprank serve`` end to end: a real server process, real HTTP, a tiny random-weight model.

The oracles are the library paths the server must agree with: ``grouprank rerank`` (same model,
seed, documents) for rerank scores, ``Sampler.generate`` for greedy completions, the serial
answers of the same server for concurrent clients, and the ``openai`` client for the API shape.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time

import pytest

from grouprank_jax.cli import main

from serve_client import SERVER_FLAGS, Server, make_tiny_model

QUERY = "how do tides form"
DOCS = [
    "Tides are caused by the gravitational pull of the moon and the sun on the oceans.",
    "The stock market closed higher today after a volatile session. " + "Shares rose. " * 300,  # over the budget
    "Spring tides happen when the sun and moon align.",
    "A recipe for banana bread with walnuts.",
    "Ocean water bulges toward the moon, producing high tide.",
]
SCORES = [12.5, 3.0, 9.25, 1.0, 7.5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("serve_model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("serve_log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sampler(model_dir):
    from grouprank_jax.sampling import Sampler
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import load_hf

    return Sampler(load_hf(model_dir), tokenizer=load_tokenizer(), max_prompt_len=256, max_new_tokens=16)


def _chat(content: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def test_health_models_and_metrics(server):
    assert server.get("/health") == (200, {"status": "ok", "model": "tiny"})
    status, models = server.get("/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    text = server.get("/metrics")[1]
    for series in ("grouprank_queue_depth", "grouprank_batch_size_count", "grouprank_generated_tokens_per_second"):
        assert re.search(rf"^{series} ", text, re.M), series


def test_rerank_equals_the_rerank_cli(server, model_dir, tmp_path, capsys):
    hits = [{"qid": "q", "docid": str(i), "content": d, "score": s} for i, (d, s) in enumerate(zip(DOCS, SCORES))]
    data = tmp_path / "in.json"
    data.write_text(json.dumps([{"query": QUERY, "hits": hits}]))
    flags = {k: v for k, v in SERVER_FLAGS.items() if k in ("--prompt", "--group-size", "--max-doc-chars", "--seed")}
    argv = ["rerank", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out.run")]
    argv += [x for kv in flags.items() for x in kv] + ["--temperature", "0", "--batch-size", "8"]
    argv += ["--max-new-tokens", SERVER_FLAGS["--max-new-tokens"], "--max-prompt-len", SERVER_FLAGS["--max-prompt-len"]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    cli = {line.split()[2]: float(line.split()[4]) for line in (tmp_path / "out.run").read_text().splitlines()}

    body = {"model": "tiny", "query": QUERY, "documents": [{"text": d, "score": s} for d, s in zip(DOCS, SCORES)]}
    status, out = server.post("/v1/rerank", body)
    assert status == 200, out
    assert len(out["results"]) == len(DOCS)
    for item in out["results"]:
        assert item["relevance_score"] == pytest.approx(cli[str(item["index"])], abs=1e-6)
    assert out["meta"]["groups"] == 3  # ceil(5 / 2)
    assert out["meta"]["parse_failures"] == int(re.search(r"parse failures (\d+)", printed).group(1))
    generated = int(re.search(r"generated tokens (\d+)", printed).group(1))
    assert out["usage"]["total_tokens"] - out["usage"]["prompt_tokens"] == generated


def test_rerank_top_n_documents_order_and_usage(server):
    from grouprank_jax.task.prompts import count_tokens, load_template, render_prompt
    from grouprank_jax.task.rerank import Candidate, RerankConfig, rerank
    from grouprank_jax.tokenizer import load_tokenizer

    status, full = server.post("/rerank", {"query": QUERY, "documents": DOCS})
    assert status == 200, full
    scores = [r["relevance_score"] for r in full["results"]]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in full["results"]) == list(range(5))
    assert "document" not in full["results"][0] and not full["meta"]["fused_with_first_stage"]

    status, top = server.post("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True})
    assert status == 200 and top["results"] == [
        {**r, "document": {"text": DOCS[r["index"]]}} for r in full["results"][:2]
    ]
    # prompt_tokens: the prompts the rerank library renders for these documents, tokenized.
    tok, template, seen = load_tokenizer(), load_template("compact"), []
    budget = int(SERVER_FLAGS["--max-prompt-len"])

    def score_fn(prompts):
        seen.extend(prompts)
        return [""] * len(prompts)

    rerank(
        {"q": QUERY},
        {"q": [Candidate(str(i), d, 0.0) for i, d in enumerate(DOCS)]},
        score_fn,
        lambda q, docs: render_prompt(tok, q, docs, template, int(SERVER_FLAGS["--max-doc-chars"]), budget),
        RerankConfig(top_n=5, group_size=2, fusion_weight=1.0, seed=7),
    )
    lengths = [count_tokens(tok, p) for p in seen]
    assert max(lengths) == pytest.approx(budget, abs=8)  # the long document was shrunk to fit, not rejected
    assert top["usage"]["prompt_tokens"] == sum(lengths)
    assert top["usage"]["total_tokens"] > top["usage"]["prompt_tokens"]


def test_chat_and_completions_greedy_equal_the_sampler(server, sampler):
    from grouprank_jax.sampling import SamplingParams
    from grouprank_jax.task.prompts import render_chat

    tok = sampler.tokenizer
    text = render_chat(tok, [{"role": "user", "content": "Rank these documents"}])
    for path, body, prompt in (
        ("/v1/chat/completions", _chat("Rank these documents", max_tokens=5), text),
        ("/v1/completions", {"prompt": "The tide", "max_tokens": 5, "temperature": 0, "n": 2}, "The tide"),
    ):
        status, out = server.post(path, body)
        assert status == 200, out
        ids = tok.encode(prompt, add_special_tokens=False)
        want = sampler.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=5))
        got = [c["message"]["content"] if "message" in c else c["text"] for c in out["choices"]]
        assert got == [want.texts[0]] * body.get("n", 1)
        assert [c["finish_reason"] for c in out["choices"]] == [want.finish_reasons[0]] * body.get("n", 1)
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert out["usage"]["completion_tokens"] == int(want.lengths[0]) * body.get("n", 1)


def test_the_openai_client_works_unchanged(server, sampler):
    import openai

    from grouprank_jax.sampling import SamplingParams
    from grouprank_jax.task.prompts import render_chat

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    messages = [{"role": "user", "content": "hello"}]
    ids = sampler.tokenizer.encode(render_chat(sampler.tokenizer, messages), add_special_tokens=False)
    want = sampler.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=5))
    assert reply.choices[0].message.content == want.texts[0]
    assert reply.usage.completion_tokens == int(want.lengths[0])
    text = client.completions.create(model="tiny", prompt="The tide", max_tokens=3, temperature=0)
    assert text.choices[0].text and text.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="exceeds the limit of 8"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=9)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled_with_seeds"])
def test_32_concurrent_clients_get_their_own_serial_answers_and_are_batched(server, sampled):
    """Sampled: each request's ``seed`` reproduces its answer whatever it is batched with."""
    words = "tide moon ocean sun gravity wave bread market walnut spring".split()
    prompts = [" ".join(words[(i * k) % 10] for k in (1, 3, 7)) + f" {i}" for i in range(32)]
    sampling = lambda i: {"temperature": 1.0, "seed": 1000 + i} if sampled else {"temperature": 0}
    bodies = [{"prompt": p, "max_tokens": 8, **sampling(i)} for i, p in enumerate(prompts)]
    serial = [server.post("/v1/completions", b) for b in bodies]
    before = server.metrics()
    concurrent = server.parallel("/v1/completions", bodies)
    after = server.metrics()
    assert all(status == 200 for status, _ in serial + concurrent)
    answers = [out["choices"][0]["text"] for _, out in concurrent]
    assert answers == [out["choices"][0]["text"] for _, out in serial]
    assert len(set(answers)) > 1  # distinct prompts give distinct answers, so a mix-up would show
    batches = after["grouprank_batch_size_count"] - before["grouprank_batch_size_count"]
    rows = after["grouprank_batch_size_sum"] - before["grouprank_batch_size_sum"]
    assert rows == 32 and rows / batches > 1, (rows, batches)


LONG = "tide " * 400  # > 256 prompt tokens
BAD_INPUTS = [
    # (path, body (bytes = raw), status, code, param)
    ("/v1/rerank", b'{"query": "x", "documents": [', 400, "invalid_json", None),
    ("/v1/rerank", b"[1, 2]", 400, "invalid_json", None),
    ("/v1/rerank", {"query": 5, "documents": ["a"]}, 400, "invalid_type", "query"),
    ("/v1/rerank", {"query": "x", "documents": [7]}, 400, "invalid_type", "documents.0"),
    ("/v1/rerank", {"documents": ["a"]}, 400, "missing_field", "query"),
    ("/v1/rerank", {"query": "x", "documents": []}, 400, "invalid_value", "documents"),
    ("/v1/rerank", {"query": "x", "documents": ["a"], "top_n": 0}, 400, "invalid_value", "top_n"),
    ("/v1/rerank", {"query": "x", "documents": [{"text": "a", "score": 1}, "b"]}, 400, "invalid_value", "documents"),
    ("/v1/rerank", {"query": "x", "documents": ["d"] * 101}, 400, "too_many_documents", "documents"),
    ("/v1/rerank", {"query": LONG, "documents": ["a"]}, 400, "prompt_too_long", "query"),
    ("/v1/rerank", {"query": "x", "documents": ["d"] * 82}, 413, "request_too_large", None),
    ("/v1/rerank", {"query": "x", "documents": ["x" * 70000]}, 413, "request_too_large", None),
    ("/v1/rerank", {"model": "other", "query": "x", "documents": ["a"]}, 404, "model_not_found", "model"),
    (  # JSON's Infinity: was a plain-text 500 (the response could not be serialized), counted as 200
        "/v1/rerank",
        {"query": "x", "documents": [{"text": "a", "score": 1.0}, {"text": "b", "score": float("inf")}]},
        400,
        "invalid_value",
        "documents.1.score",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "missing_field", "messages.0.content"),
    ("/v1/chat/completions", _chat("x", n=9), 400, "invalid_value", "n"),
    ("/v1/chat/completions", _chat("x", max_tokens=17), 400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", _chat("x", temperature=-1), 400, "invalid_value", "temperature"),
    ("/v1/chat/completions", _chat("x", stream=True), 400, "unsupported", "stream"),
    ("/v1/chat/completions", _chat(LONG), 400, "context_length_exceeded", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 9, "n": 5, "max_tokens": 2}, 413, "request_too_large", None),
    ("/v1/embeddings", {"input": "x"}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,code,param", BAD_INPUTS, ids=[f"{b[2]}-{b[3]}" for b in BAD_INPUTS])
def test_bad_input_gets_its_error_and_the_server_keeps_serving(server, path, body, status, code, param):
    got_status, out = server.post(path, body)
    assert got_status == status, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["code"] == code and out["error"]["param"] == param and out["error"]["message"]
    if code in ("prompt_too_long", "context_length_exceeded"):
        assert "256" in out["error"]["message"]  # names the limit
    assert server.post("/v1/completions", {"prompt": "still there?", "max_tokens": 2, "temperature": 0})[0] == 200


def test_extreme_but_valid_inputs_are_answered(server):
    """First-stage scores at the ends of the float64 range (their difference overflows), and a
    seed near 2**32 whose later chunks (n x prompts > --max-batch) step past it: both used to fail
    with a 500, the seed one also for other clients batched with it."""
    before = server.metrics()
    docs = [{"text": "tides and the moon", "score": 1e308}, {"text": "banana bread", "score": -1e308}]
    status, out = server.post("/v1/rerank", {"query": "tides", "documents": docs})
    assert status == 200, out
    assert sorted(r["index"] for r in out["results"]) == [0, 1]
    assert all(math.isfinite(r["relevance_score"]) for r in out["results"]), out
    body = {"prompt": ["x", "y"], "n": 5, "max_tokens": 2, "temperature": 1.0, "seed": 2**32 - 1}
    status, out = server.post("/v1/completions", body)
    assert status == 200, out
    assert len(out["choices"]) == 10
    after = server.metrics()
    key = 'grouprank_requests_total{endpoint="rerank",status="200"}'
    assert after[key] - before.get(key, 0.0) == 1


def test_wrong_method_is_405(server):
    status, out = server.get("/v1/rerank")
    assert status == 405 and out["error"]["type"] == "invalid_request_error"


def test_a_full_queue_answers_429_and_recovers(server):
    # 16 requests x 8 generations = 128 > --max-queue 40: some must be turned away, none lost.
    bodies = [_chat(f"load {i}", n=8, max_tokens=16) for i in range(16)]
    results = server.parallel("/v1/chat/completions", bodies)
    statuses = sorted(status for status, _ in results)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
    busy = next(out for status, out in results if status == 429)
    assert busy["error"]["type"] == "rate_limit_error" and busy["error"]["code"] == "queue_full"
    assert all(len(out["choices"]) == 8 for status, out in results if status == 200)
    assert server.metrics()["grouprank_queue_depth"] == 0


def test_a_client_that_disconnects_does_not_hurt_the_server(server):
    before = server.metrics().get('grouprank_requests_total{endpoint="chat",status="499"}', 0)
    body = json.dumps(_chat("goodbye", max_tokens=13, temperature=0.5, top_p=0.9)).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        time.sleep(0.05)  # the request is queued (a new sampling program compiles for seconds)
    deadline = time.monotonic() + 30
    while server.metrics().get('grouprank_requests_total{endpoint="chat",status="499"}', 0) == before:
        assert time.monotonic() < deadline, "the disconnect was never noticed"
        time.sleep(0.2)
    assert server.post("/v1/chat/completions", _chat("hello again", max_tokens=2))[0] == 200
