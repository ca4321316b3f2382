"""Teachers: an OpenAI-compatible HTTP endpoint (async) behind the disk cache.

``Teacher.complete(bodies)`` answers a list of chat-completion request bodies: cached answers
come from the disk cache, the rest go to the backend, and each answer is written to the cache
(fsync'ed) the moment it arrives, so an interrupted run loses at most the requests in flight.

``HttpBackend`` POSTs ``{url}/chat/completions`` with up to ``concurrency`` requests in flight
(one ``httpx.AsyncClient``), a timeout per request, and retries with exponential backoff and
jitter on 429, 5xx, timeouts, connection errors and unreadable 200 bodies
(``backoff * 2**attempt``, capped at ``backoff_max``, then a uniform draw in [d/2, d]; a
``Retry-After`` header is honoured). A 400, 413 or 422 refuses that one request (e.g. over the
teacher's context, as vLLM answers): its answer is empty, counted like an unparsable one
(re-asked, then missing), never cached, and the run goes on with a warning; but a teacher that
refuses its first ``REFUSAL_LIMIT`` requests without ever answering one is misconfigured and stops
the run. Any other 4xx, or a request still failing after ``http_retries`` retries, stops the run
with a one-line ``TeacherError``: rerunning the same command resumes from the cache. The API key
is read from the environment variable named by ``api_key_env`` and sent as ``Authorization:
Bearer``; it is never logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
from collections.abc import Callable, Sequence

from grouprank_jax.errors import UserError
from grouprank_jax.synth.cache import Completion, DiskCache, cache_key

log = logging.getLogger(__name__)

OnDone = Callable[[int, Completion], None]
REFUSED = (400, 413, 422)  # statuses that refuse the request itself, not the teacher
REFUSAL_LIMIT = 8  # refusals before any answer (this run, or cached) that stop the run


class TeacherError(UserError):
    """A teacher endpoint that refuses or keeps failing (the message names the URL, never the key)."""


@dataclasses.dataclass
class TeacherStats:
    requests: int = 0  # answers paid for in this run (the backend answered)
    cached: int = 0  # answers served from the disk cache
    http_retries: int = 0  # 429 / 5xx / timeout / transport retries
    prompt_tokens: int = 0  # of the paid answers
    completion_tokens: int = 0
    cached_completion_tokens: int = 0  # of the cached answers (tokens not paid again)
    refused: int = 0  # requests refused with HTTP 400/413/422 (answered empty, not cached)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout: float = 300.0
    http_retries: int = 6
    backoff: float = 1.0
    backoff_max: float = 60.0


class _Retry(Exception):
    def __init__(self, why: str, wait: float | None = None):
        super().__init__(why)
        self.wait = wait


class HttpBackend:
    """Chat completions from an OpenAI-compatible server (vLLM, SGLang, a hosted API, ...)."""

    def __init__(self, cfg: HttpConfig, stats: TeacherStats):
        if cfg.concurrency < 1 or cfg.http_retries < 0 or cfg.timeout <= 0:
            raise ValueError("--concurrency must be >= 1, --http-retries >= 0 and --timeout > 0")
        self.cfg = cfg
        self.stats = stats
        self.model = cfg.model
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self.first_refusal: str | None = None
        self.answered = 0  # 200s read

    def describe(self) -> dict:
        return {"backend": "http", "url": self.cfg.url, "model": self.cfg.model, "api_key_env": self.cfg.api_key_env}

    def run(self, bodies: Sequence[dict], on_done: OnDone) -> None:
        if not bodies:
            return
        refused = self.stats.refused
        asyncio.run(self._run(bodies, on_done))
        refused = self.stats.refused - refused
        if refused == len(bodies) and self._never_answered():
            raise TeacherError(f"teacher {self.endpoint} refused every request ({refused}): {self.first_refusal}")
        if refused:
            log.warning(
                "teacher %s refused %d of %d requests (first: %s); they count as unparsable answers and "
                "are asked again by a rerun",
                self.endpoint,
                refused,
                len(bodies),
                self.first_refusal,
            )

    def _never_answered(self) -> bool:
        """No answer read in this process and none cached: nothing shows the teacher works."""
        return self.answered == 0 and self.stats.cached == 0

    async def _run(self, bodies: Sequence[dict], on_done: OnDone) -> None:
        import httpx

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        async with httpx.AsyncClient(timeout=self.cfg.timeout, headers=headers, limits=limits) as client:

            async def one(index: int, body: dict) -> None:
                async with semaphore:
                    completion = await self._post(client, body)
                on_done(index, completion)

            tasks = [asyncio.ensure_future(one(i, b)) for i, b in enumerate(bodies)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _post(self, client, body: dict) -> Completion:
        import httpx

        for attempt in range(self.cfg.http_retries + 1):
            try:
                return self._read(await client.post(self.endpoint, json=body))
            except (httpx.TimeoutException, httpx.TransportError, _Retry) as err:
                why = f"{type(err).__name__}: {err}" if not isinstance(err, _Retry) else str(err)
                if attempt == self.cfg.http_retries:
                    raise TeacherError(
                        f"teacher {self.endpoint} still failing after {self.cfg.http_retries} retries ({why}); "
                        "rerun the same command to resume (answers so far are cached)"
                    ) from None
                delay = min(self.cfg.backoff_max, self.cfg.backoff * 2**attempt)
                delay = random.uniform(delay / 2, delay)
                if isinstance(err, _Retry) and err.wait is not None:
                    delay = max(delay, min(err.wait, self.cfg.backoff_max))
                self.stats.http_retries += 1
                log.debug("retrying %s in %.2f s (%s)", self.endpoint, delay, why)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _read(self, response) -> Completion:
        status = response.status_code
        if status == 429 or status >= 500:
            wait = response.headers.get("retry-after")
            try:
                wait_s = float(wait) if wait is not None else None
            except ValueError:
                wait_s = None
            raise _Retry(f"HTTP {status}", wait_s)
        if status in REFUSED:
            self.stats.refused += 1
            if self.first_refusal is None:
                self.first_refusal = f"HTTP {status} {response.text[:200]!r}"
            if self.stats.refused >= REFUSAL_LIMIT and self._never_answered():
                raise TeacherError(
                    f"teacher {self.endpoint} refused its first {self.stats.refused} requests and answered "
                    f"none: {self.first_refusal}"
                )
            return Completion("", 0, 0, cacheable=False)
        if status != 200:
            raise TeacherError(f"teacher {self.endpoint} answered HTTP {status}: {response.text[:200]!r}")
        try:
            data = response.json()
            message = data["choices"][0]["message"]
            text = message.get("content") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retry(f"unreadable 200 response {response.text[:80]!r}") from None
        self.answered += 1
        return Completion(str(text), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class Teacher:
    """A backend behind the disk cache, with its counters. ``role`` names it in logs/manifest."""

    def __init__(self, role: str, backend, cache: DiskCache):
        self.role = role
        self.backend = backend
        self.cache = cache
        self.stats: TeacherStats = backend.stats

    @property
    def model(self) -> str:
        return self.backend.model

    def body(self, messages: list[dict], **params) -> dict:
        return {"model": self.model, "messages": messages, **params}

    def complete(self, bodies: Sequence[dict], progress: Callable[[int], None] | None = None) -> list[Completion]:
        keys = [cache_key(self.model, b) for b in bodies]
        results: list[Completion | None] = [self.cache.get(k) for k in keys]
        hits = [r for r in results if r is not None]
        self.stats.cached += len(hits)
        self.stats.cached_completion_tokens += sum(r.completion_tokens for r in hits)
        if progress is not None and hits:
            progress(len(hits))
        first: dict[str, int] = {}
        for i, key in enumerate(keys):  # one request per distinct body
            if results[i] is None and key not in first:
                first[key] = i
        todo = list(first.values())

        def on_done(j: int, completion: Completion) -> None:
            i = todo[j]
            if completion.cacheable:
                self.cache.put(keys[i], self.model, completion)
            results[i] = completion
            self.stats.requests += 1
            self.stats.prompt_tokens += completion.prompt_tokens
            self.stats.completion_tokens += completion.completion_tokens
            if progress is not None:
                progress(1)

        self.backend.run([bodies[i] for i in todo], on_done)
        for i, key in enumerate(keys):
            if results[i] is None:  # a body repeated in this round: served by its first copy's answer
                results[i] = results[first[key]]
                self.stats.cached += 1
        return results  # type: ignore[return-value]
