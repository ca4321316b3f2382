"""``ServeConfig``: every setting of one ``grouprank serve`` process (the CLI flags, validated)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from grouprank_jax.errors import UserError
from grouprank_jax.sampling.params import sampling_settings_problem


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: str  # anything ``load_model`` accepts: HF dir, import-hf checkpoint, training run dir
    served_model_name: str | None = None  # the name in /v1/models and requests; default: the model dir's name
    tokenizer: str | None = None  # default: the bundled Qwen2.5 tokenizer
    host: str = "127.0.0.1"
    port: int = 8000
    mesh: str | None = None  # "data,fsdp,tensor" over all devices; None: one device
    # Batching and bounds.
    max_batch: int = 16  # generations per Sampler.generate call
    max_wait_ms: float = 10.0  # how long the first queued generation waits for company
    max_queue: int = 256  # generations waiting or running; beyond: 429
    max_body_bytes: int = 8 * 2**20  # request bodies beyond: 413
    max_prompt_len: int = 4096  # prompt token budget (rerank documents shrink to fit; chat prompts beyond: 400)
    max_new_tokens: int = 1024  # rerank generation budget and the cap on a request's max_tokens
    max_n: int = 8  # cap on a request's n
    max_documents: int = 1000  # cap on a rerank request's documents
    api_key_env: str | None = None  # name of the env var holding the API key; None: no auth
    # Rerank scoring, as ``grouprank rerank``.
    prompt: str = "grouprank"
    group_size: int = 20
    repeats: int = 1
    fusion_weight: float = 0.6  # used when the request's documents carry first-stage scores
    max_doc_chars: int = 3000
    temperature: float = 0.3
    top_p: float = 0.8
    top_k: int = 0
    seed: int = 666

    def __post_init__(self):
        positive = ("port", "max_batch", "max_queue", "max_body_bytes", "max_prompt_len", "max_new_tokens", "max_n")
        for name in positive + ("max_documents", "group_size", "repeats", "max_doc_chars"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < self.max_batch:
            raise UserError(f"--max-queue ({self.max_queue}) must be >= --max-batch ({self.max_batch})")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise UserError(f"--fusion-weight must be in [0, 1], got {self.fusion_weight}")
        # Checked here, not at the first rerank request, where a bad value would fail every batch.
        problem = sampling_settings_problem(
            self.temperature, self.top_p, self.top_k, name=lambda field: "--" + field.replace("_", "-")
        )
        if problem:
            raise UserError(problem)
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32), got {self.seed}")
        self.mesh_shape()

    def mesh_shape(self) -> tuple[int, int, int] | None:
        """``--mesh data,fsdp,tensor`` as three integers (-1: the rest of the devices), or None."""
        if self.mesh is None:
            return None
        parts = self.mesh.split(",")
        try:
            shape = tuple(int(x) for x in parts)
        except ValueError:
            shape = ()
        if len(parts) != 3 or len(shape) != 3 or any(x == 0 or x < -1 for x in shape):
            raise UserError(
                f"--mesh must be data,fsdp,tensor: three integers >= 1 or -1 (e.g. 1,-1,1), got {self.mesh!r}"
            )
        return shape

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

    def api_key(self) -> str | None:
        """The key clients must send (``Authorization: Bearer KEY``), or None when auth is off."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise UserError(f"--api-key-env {self.api_key_env}: that environment variable is unset or empty")
        return key
