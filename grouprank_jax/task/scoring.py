"""A ``score_fn`` for ``rerank`` backed by the JAX sampler (the model scores groups of prompts)."""

from __future__ import annotations

import dataclasses

import numpy as np

from grouprank_jax.sampling import Sampler, SamplingParams


@dataclasses.dataclass
class ScoringCounters:
    calls: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def sampler_score_fn(
    model,
    tokenizer,
    *,
    mesh=None,
    max_prompt_len: int = 16384,
    max_new_tokens: int = 1024,
    temperature: float = 0.3,
    top_p: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
    counters: ScoringCounters | None = None,
    sampler: Sampler | None = None,
):
    """Greedy when ``temperature == 0``; the paper's inference uses temperature 0.3, top_p 0.8.

    ``sampler``: an existing ``Sampler`` of ``model`` to reuse (with its compiled programs: passes
    at other seeds or temperatures then compile nothing new); built from the arguments otherwise.
    """
    if sampler is None:
        sampler = Sampler(
            model, tokenizer=tokenizer, mesh=mesh, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens
        )
    elif sampler.model is not model:
        raise ValueError("sampler= must be a Sampler of the model being scored")
    counters = counters if counters is not None else ScoringCounters()

    def score_fn(prompts: list[str]) -> list[str]:
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            n=1,
            seed=seed + counters.calls,  # fresh randomness per call, reproducible per run
            max_new_tokens=max_new_tokens,
            stop=("</answer>",),
        )
        out = sampler.generate(prompts, params)
        counters.calls += 1
        counters.prompt_tokens += int(out.stats.prompt_tokens)
        counters.generated_tokens += int(np.asarray(out.lengths).sum())
        counters.prefill_seconds += out.stats.prefill_seconds
        counters.decode_seconds += out.stats.decode_seconds
        return list(out.texts)

    score_fn.counters = counters
    return score_fn
