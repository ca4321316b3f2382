"""Per-call sampling settings (``Sampler.generate(prompts, SamplingParams(...))``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def sampling_settings_problem(temperature: float, top_p: float, top_k: int, name=lambda field: field) -> str | None:
    """What is wrong with these settings, or None; ``name`` spells a field as its caller's users
    know it (e.g. a CLI flag)."""
    if temperature < 0:
        return f"{name('temperature')} must be >= 0 (0 = greedy), got {temperature}"
    if not 0.0 < top_p <= 1.0:
        return f"{name('top_p')} must be in (0, 1] (1.0 disables nucleus sampling), got {top_p}"
    if top_k < 0:
        return f"{name('top_k')} must be >= 0 (0 disables top-k), got {top_k}"
    return None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one ``generate`` call.

    temperature: 0 is greedy (argmax); the paper samples GRPO rollouts at 1.0 and runs inference
        at 0.3 with top_p 0.8.
    top_p: nucleus mass in (0, 1]; 1.0 disables it. top_k: 0 disables it. Order: temperature,
        then top-k, then top-p (as HF's logits warpers).
    n: rollouts per prompt (GRPO's G); each prompt is prefilled once and its cache repeated.
    seed: PRNG seed of this call; the output row index and the step are folded in, so rows differ
        and a call with the same seed and prompts reproduces its samples exactly (per-prompt
        seeds: ``Sampler.generate(streams=...)``). Taken modulo 2**32 (the sampler's key is
        32-bit), so derived seeds such as ``seed + pass`` never overflow.
    max_new_tokens: None takes the sampler's default.
    stop: strings that end a completion (kept in the output, since the reward parser needs e.g.
        the closing ``</answer>``); needs a tokenizer.
    stop_token_ids: ids that end a completion; None takes the sampler's (``<|im_end|>``,
        ``<|endoftext|>`` by default). The id is part of the completion and its log-prob.
    ignore_eos: never stop on ids or strings (benchmarks that need equal lengths).
    tempered_logprobs: return each sampled token's log-prob under ``softmax(logits /
        temperature)``, the distribution it was drawn from before top-k/top-p (what GRPO's ratio
        compares, as TRL and verl compute it); False: under the model's plain softmax (what
        serving APIs report). Greedy calls always use the plain softmax.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    max_new_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    tempered_logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            # A bare string would otherwise be iterated character by character.
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed={self.seed!r} must be an integer")
        object.__setattr__(self, "seed", int(self.seed) % 2**32)
        problem = sampling_settings_problem(self.temperature, self.top_p, self.top_k)
        if problem:
            raise ValueError(problem)
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1 (or None for the sampler default)")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} contains an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the returned log-probs are computed at."""
        return self.temperature if self.tempered_logprobs and not self.greedy else 1.0
