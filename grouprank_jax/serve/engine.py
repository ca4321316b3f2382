"""The engine: one worker thread that owns the model and the ``Sampler`` and batches generations.

Every piece of JAX work of the server (mesh, model load, compile, generate) runs on this thread.
Request handlers call ``submit`` with token-id prompts and their ``GenSettings``; the worker
takes the oldest waiting job, waits up to ``max_wait_ms`` (from that job's arrival) for more
jobs with the same settings, and runs them as one ``Sampler.generate`` call of at most
``max_batch`` generations (a job larger than that was split at submission). Jobs with other
settings wait for a later batch, in arrival order.

Isolation: each generation is one row of the call (``n`` > 1 becomes n rows of the same prompt),
and rows are sliced back per job in submission order, so a client only ever gets its own rows.
Greedy rows do not depend on the rest of the batch; a sampled row's random stream is its
request's seed and its index in the request (``Sampler.generate(streams=...)``), so ``seed``
reproduces a sampled answer whatever it is batched with or split into.

``max_new`` is rounded up to a power of two (>= 16, at most ``--max-new-tokens``) so requests with
nearby ``max_tokens`` share programs and batches; each row is then cut at its own ``max_tokens``,
which gives exactly the tokens of a call with ``max_new_tokens=max_tokens`` (decoding is causal).
The queue holds at most ``max_queue`` generations (waiting or running); beyond that ``submit`` raises ``QueueFull``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future

from grouprank_jax.sampling import Sampler, SamplingParams
from grouprank_jax.serve.api_errors import APIError, ClientGone, QueueFull, ShuttingDown
from grouprank_jax.serve.config import ServeConfig
from grouprank_jax.serve.metrics import Metrics

log = logging.getLogger(__name__)

MIN_NEW_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """What a Sampler program depends on: jobs batch together iff their settings are equal."""

    temperature: float
    top_p: float
    top_k: int
    max_new: int  # the bucketed generation budget of the call
    stop: tuple[str, ...]

    @classmethod
    def make(cls, *, temperature: float, top_p: float, top_k: int, max_tokens: int, stop, cap: int) -> GenSettings:
        if temperature == 0.0:  # greedy: top-p / top-k change nothing
            top_p, top_k = 1.0, 0
        bucket = 1 << max(0, (max(max_tokens, MIN_NEW_BUCKET) - 1).bit_length())
        return cls(float(temperature), float(top_p), int(top_k), min(bucket, cap), tuple(stop))


@dataclasses.dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


@dataclasses.dataclass
class _Job:
    prompts: list[list[int]]
    settings: GenSettings
    max_tokens: int
    seed: int
    first_index: int  # the index of ``prompts[0]`` in its request: with ``seed``, the random stream
    cancel: threading.Event | None
    future: Future = dataclasses.field(default_factory=Future)
    enqueued: float = dataclasses.field(default_factory=time.monotonic)


class Engine:
    def __init__(self, cfg: ServeConfig, tokenizer, metrics: Metrics):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.sampler: Sampler | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._depth = 0  # generations queued or running (the bound of --max-queue)
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="grouprank-engine", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Load the model on the worker thread; returns once it is ready (re-raises a load error)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        """Finish every queued job, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def vocab_size(self) -> int:
        return self.sampler.cfg.vocab_size

    # ---- request side -------------------------------------------------------------------
    def submit(
        self,
        prompts: list[list[int]],
        settings: GenSettings,
        max_tokens: int,
        seed: int,
        cancel: threading.Event | None = None,
    ) -> list[Future]:
        """Queue the generations (one per prompt); one future per chunk of at most ``max_batch``,
        each resolving to that chunk's ``Generation`` list. All or nothing: raises ``QueueFull`` (429)
        when the queue has no room now, a 413 ``APIError`` when it never would."""
        size = self.cfg.max_batch
        jobs = [
            _Job(prompts[i : i + size], settings, max_tokens, seed, i, cancel) for i in range(0, len(prompts), size)
        ]
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(prompts) > self.cfg.max_queue:
                raise APIError(
                    413,
                    f"this request needs {len(prompts)} generations, more than the server ever queues "
                    f"(--max-queue {self.cfg.max_queue}); send fewer documents or a smaller n",
                    code="request_too_large",
                )
            if self._depth + len(prompts) > self.cfg.max_queue:
                raise QueueFull(self._depth, len(prompts), self.cfg.max_queue)
            self._queue.extend(jobs)
            self._depth += len(prompts)
            self.metrics.set_queue_depth(self._depth)
            self._cond.notify_all()
        return [job.future for job in jobs]

    def generate(self, prompts, settings, max_tokens, seed, cancel=None) -> list[Generation]:
        """``submit`` and wait (for handler threads)."""
        out: list[Generation] = []
        for future in self.submit(prompts, settings, max_tokens, seed, cancel):
            out.extend(future.result())
        return out

    # ---- worker side --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load()
        except BaseException as err:  # reported to start()
            self._load_error = err
            self._ready.set()
            return
        self._ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _load(self) -> None:
        from grouprank_jax.weights.loading import load_model

        mesh = None
        if self.cfg.mesh:
            from grouprank_jax.config import MeshConfig
            from grouprank_jax.parallel import make_mesh

            mesh = make_mesh(MeshConfig(*self.cfg.mesh_shape()))
        model = load_model(self.cfg.model, mesh=mesh)
        self.sampler = Sampler(
            model,
            tokenizer=self.tokenizer,
            mesh=mesh,
            max_prompt_len=self.cfg.max_prompt_len,
            max_new_tokens=self.cfg.max_new_tokens,
        )
        log.info("serve: loaded %s (vocab %d)", self.cfg.model, model.cfg.vocab_size)

    def _next_batch(self) -> list[_Job] | None:
        wait = self.cfg.max_wait_ms / 1000.0
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue[0]
            while not self._stopping:
                ready = sum(len(j.prompts) for j in self._queue if j.settings == first.settings)
                left = first.enqueued + wait - time.monotonic()
                if ready >= self.cfg.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch, rows, rest = [], 0, collections.deque()
            for job in self._queue:
                if job.settings == first.settings and (not batch or rows + len(job.prompts) <= self.cfg.max_batch):
                    batch.append(job)
                    rows += len(job.prompts)
                else:
                    rest.append(job)
            self._queue = rest
        return batch

    def _finished(self, rows: int) -> None:
        with self._cond:
            self._depth -= rows
            self.metrics.set_queue_depth(self._depth)

    def _run(self, batch: list[_Job]) -> None:
        try:
            self._generate(batch)
        finally:
            self._finished(sum(len(job.prompts) for job in batch))

    def _generate(self, batch: list[_Job]) -> None:
        live = []
        for job in batch:
            if job.cancel is not None and job.cancel.is_set():
                job.future.set_exception(ClientGone())
            else:
                live.append(job)
        if not live:
            return
        s = live[0].settings
        prompts = [p for job in live for p in job.prompts]
        start = time.perf_counter()
        try:  # whatever fails here fails this batch's requests, never the worker thread
            params = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                n=1,
                max_new_tokens=s.max_new,
                stop=s.stop,
            )
            # Each generation draws from (its request's seed, its index in the request), so a
            # sampled answer does not depend on the chunking or on the requests batched with it.
            streams = [(job.seed, job.first_index + k) for job in live for k in range(len(job.prompts))]
            out = self.sampler.generate(prompts, params, streams=streams)
        except BaseException as err:
            log.exception("serve: generate failed for a batch of %d generations", len(prompts))
            for job in live:
                job.future.set_exception(err)
            return
        seconds = time.perf_counter() - start
        row, generated = 0, 0
        for job in live:
            results = []
            for prompt in job.prompts:
                results.append(self._cut(out, row, job.max_tokens, len(prompt)))
                generated += len(results[-1].token_ids)
                row += 1
            job.future.set_result(results)
        self.metrics.batch(len(prompts), int(out.stats.prompt_tokens), generated, seconds)

    def _cut(self, out, row: int, max_tokens: int, prompt_tokens: int) -> Generation:
        """Row ``row`` as a call with ``max_new_tokens=max_tokens`` would have returned it."""
        length = int(out.lengths[row])
        if length <= max_tokens:
            ids = out.tokens[row, :length].tolist()
            return Generation(tuple(ids), out.texts[row], out.finish_reasons[row], prompt_tokens)
        ids = out.tokens[row, :max_tokens].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(tuple(ids), text, "length", prompt_tokens)
