"""TEST FIXTURE (not a teacher to use): a small OpenAI-compatible chat-completions server on
127.0.0.1 whose answers are derived from qrels with deterministic noise.

It recognises the three prompts of ``grouprank_jax.synth.prompts`` (pointwise D.1, listwise D.2,
reasoning), finds the query and the documents in them by their text, and answers:

- pointwise: ``grade * 10 / 3 + N(0, pointwise_noise)`` rounded into 0..10, written in one of the
  forms a real teacher uses ("Relevance score: 7", "Relevance score: 7/10", "... 6.5.");
- listwise: the passages sorted by ``grade + N(0, listwise_noise)``, as a fenced JSON array after a
  line of reasoning; for ``defect_rate`` of the queries the array repeats one id and leaves one
  out (the permutation repair's case);
- reasoning: one sentence.

The noise of a (query, document) is a function of their ids, so every answer is a pure function
of the request. Faults: ``error_rate`` of the requests get HTTP 500 (a seeded RNG, per call);
``garbage_rate`` of the request bodies (a function of the body, so a restarted client meets the
same ones) get a 200 whose content no parser accepts. With ``api_key``, a request without
``Authorization: Bearer <api_key>`` gets 401. ``log`` records every answered (200)
request as ``(time, cache key)``, the key being the one the client's cache uses.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from grouprank_jax.synth.cache import cache_key
from grouprank_jax.task.prompts import clean_document

_POINTWISE = re.compile(r"Here is the query: (.*?)\n\nHere is the document: (.*?)\n\nNote that your answer", re.S)
_LISTWISE = re.compile(r"The user's query is: (.*?)\n\nHere are the passages to evaluate:\n(.*)\Z", re.S)
_PASSAGE = re.compile(r"\[(\d+)\]\. (.*?)\n\n", re.S)


def _unit(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _gauss(*parts: str) -> float:
    return random.Random(hashlib.sha256("\x1f".join(parts).encode()).digest()).gauss(0.0, 1.0)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the client opens up to --concurrency connections at once


class TeacherServer:
    def __init__(
        self,
        queries: dict[str, str],
        texts: dict[str, str],
        qrels: dict[str, dict[str, int]],
        *,
        max_doc_chars: int = 3000,
        pointwise_noise: float = 2.5,
        listwise_noise: float = 0.9,
        defect_rate: float = 0.3,
        error_rate: float = 0.0,
        garbage_rate: float = 0.0,
        delay: float = 0.0,
        seed: int = 0,
        api_key: str | None = None,
        refuse_pointwise: frozenset[str] = frozenset(),
    ):
        self.qid_of = {text: qid for qid, text in queries.items()}
        self.docid_of = {clean_document(text, max_doc_chars): docid for docid, text in texts.items()}
        self.qrels = qrels
        self.pointwise_noise, self.listwise_noise, self.defect_rate = pointwise_noise, listwise_noise, defect_rate
        self.error_rate, self.garbage_rate, self.delay = error_rate, garbage_rate, delay
        self.rng = random.Random(seed)
        self.api_key = api_key
        self.refuse_pointwise = refuse_pointwise  # docids whose pointwise prompt gets vLLM's over-context 400
        self.refused = 0
        self.lock = threading.Lock()
        self.log: list[tuple[float, str]] = []
        self.errors = self.garbage = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.answer(self.path, body, self.headers.get("Authorization"))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> TeacherServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def grade(self, qid: str, docid: str) -> int:
        return max(0, self.qrels.get(qid, {}).get(docid, 0))

    def answer(self, path: str, body: dict, authorization: str | None = None) -> tuple[int, dict]:
        if self.delay:
            time.sleep(self.delay)
        if not path.endswith("/chat/completions"):
            return 404, {"error": "not found"}
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return 401, {"error": "invalid API key"}
        with self.lock:
            if self.rng.random() < self.error_rate:
                self.errors += 1
                return 500, {"error": "injected failure"}
        prompt = body["messages"][-1]["content"]
        canonical = json.dumps(body, sort_keys=True)
        if _unit(canonical, "garbage") < self.garbage_rate:
            text = "I am not sure, the passages are all interesting."
            with self.lock:
                self.garbage += 1
        elif m := _POINTWISE.search(prompt):
            if self.docid_of[m.group(2)] in self.refuse_pointwise:
                with self.lock:
                    self.refused += 1
                message = "This model's maximum context length is 512 tokens. However, you requested 900 tokens."
                return 400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400}
            text = self._pointwise(self.qid_of[m.group(1)], self.docid_of[m.group(2)])
        elif m := _LISTWISE.search(prompt):
            docids = [self.docid_of[t] for _, t in _PASSAGE.findall(m.group(2))]
            text = self._listwise(self.qid_of[m.group(1)], docids)
        else:
            text = "Each score follows from how directly the document answers the query."
        with self.lock:
            self.log.append((time.monotonic(), cache_key(body["model"], body)))
        return 200, {
            "id": "test",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4},
        }

    def _pointwise(self, qid: str, docid: str) -> str:
        value = self.grade(qid, docid) * 10 / 3 + self.pointwise_noise * _gauss(qid, docid, "pointwise")
        value = min(10.0, max(0.0, value))
        form = int(_unit(qid, docid, "form") * 3)
        if form == 0:
            return f"Relevance score: {round(value)}"
        if form == 1:
            return f"Relevance score: {round(value)}/10"
        return f"Relevance score: {round(value * 2) / 2:.1f}."

    def _listwise(self, qid: str, docids: list[str]) -> str:
        keys = [self.grade(qid, d) + self.listwise_noise * _gauss(qid, d, "listwise") for d in docids]
        ids = [i + 1 for i in sorted(range(len(docids)), key=lambda i: -keys[i])]
        if len(ids) > 2 and _unit(qid, "defect") < self.defect_rate:
            ids[-1] = ids[0]  # one id twice, the last one missing
        return "The first passages answer the query directly.\n```json\n" + json.dumps(ids) + "\n```"
