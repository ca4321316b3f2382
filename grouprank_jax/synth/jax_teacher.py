"""The in-process teacher: a model on the JAX ``Sampler``, batched (``--pointwise-model PATH``
with no ``--pointwise-url``), so a TPU team can label with a big open model on its own pod.

It answers the same request bodies as an HTTP teacher: the messages are rendered with the
tokenizer's chat template (generation prompt added); ``temperature``, ``top_p``, ``max_tokens``
and ``seed`` are honoured. Requests are batched ``batch_size`` at a time among those with the same
sampling settings; each request's random stream is its ``seed`` and a hash of its body, so an
answer depends on the request alone (not on its batch-mates, nor on what a resumed run still
asks). A prompt longer than ``max_prompt_len`` tokens is not run: its answer is empty (a format
failure the stage counts); lower ``--max-doc-chars`` or raise ``--teacher-max-prompt-len``.
Answers go through the same disk cache (model key ``jax:<resolved path>``).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

from grouprank_jax.synth.cache import Completion
from grouprank_jax.synth.client import OnDone, TeacherStats

log = logging.getLogger(__name__)


class JaxBackend:
    def __init__(
        self,
        model_path: str,
        stats: TeacherStats,
        *,
        tokenizer_path: str | None = None,
        batch_size: int = 16,
        max_prompt_len: int = 8192,
        max_new_tokens: int = 1024,
        loaded: tuple | None = None,
    ):
        from grouprank_jax.sampling import Sampler
        from grouprank_jax.tokenizer import load_tokenizer
        from grouprank_jax.weights.loading import load_model

        if batch_size < 1:
            raise ValueError(f"--teacher-batch-size must be >= 1, got {batch_size}")
        self.stats = stats
        self.path = str(Path(model_path).resolve())
        self.model = f"jax:{self.path}"
        self.batch_size = batch_size
        self.max_prompt_len = max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.too_long = 0
        if loaded is None:  # pointwise and listwise may share one loaded model
            tokenizer = load_tokenizer(tokenizer_path)
            loaded = (load_model(model_path), tokenizer)
        self.loaded = loaded
        model, self.tokenizer = loaded
        self.sampler = Sampler(
            model, tokenizer=self.tokenizer, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens
        )

    def describe(self) -> dict:
        return {"backend": "jax", "model_path": self.path, "batch_size": self.batch_size}

    def run(self, bodies: Sequence[dict], on_done: OnDone) -> None:
        from grouprank_jax.sampling import SamplingParams

        groups: dict[tuple, list[int]] = {}
        for i, body in enumerate(bodies):
            key = (
                float(body.get("temperature", 1.0)),
                float(body.get("top_p", 1.0)),
                int(min(body.get("max_tokens") or self.max_new_tokens, self.max_new_tokens)),
            )
            groups.setdefault(key, []).append(i)
        for (temperature, top_p, max_new), indices in groups.items():
            encoded = {}
            for i in indices:
                text = self.tokenizer.apply_chat_template(
                    bodies[i]["messages"], tokenize=False, add_generation_prompt=True
                )
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if len(ids) > self.max_prompt_len:
                    self.too_long += 1
                    log.warning(
                        "in-process teacher: a %d-token prompt exceeds --teacher-max-prompt-len %d; answered empty",
                        len(ids),
                        self.max_prompt_len,
                    )
                    on_done(i, Completion("", len(ids), 0, cacheable=False))
                else:
                    encoded[i] = ids
            ready = list(encoded)
            for start in range(0, len(ready), self.batch_size):
                chunk = ready[start : start + self.batch_size]
                params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new)
                streams = [(int(bodies[i].get("seed", 0)), _body_index(bodies[i])) for i in chunk]
                out = self.sampler.generate([encoded[i] for i in chunk], params, streams=streams)
                for row, i in enumerate(chunk):
                    on_done(i, Completion(out.texts[row], len(encoded[i]), int(out.lengths[row])))


def _body_index(body: dict) -> int:
    """A stable 31-bit number of the request body: its stream index (``batch.row_streams``)."""
    return zlib.crc32(json.dumps(body, sort_keys=True).encode()) & 0x7FFFFFFF
