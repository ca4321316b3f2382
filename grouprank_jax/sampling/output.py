"""What ``Sampler.generate`` returns: the rollouts and the call's timings."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplerStats:
    prefill_seconds: float  # wall time of the prefill call (includes compilation when compiled)
    decode_seconds: float  # wall time of the decode loop (same)
    prompt_tokens: int  # real (unpadded) prompt tokens prefilled
    generated_tokens: int  # sum of lengths over the returned rows
    decode_steps: int  # loop iterations run (<= max_new_tokens; fewer on early exit)
    batch_bucket: int  # prompts per prefill after padding to the batch bucket
    prompt_bucket: int  # padded prompt length
    compiled: bool  # this call hit a shape not seen before (timings include compilation)


@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """Rows are prompt-major: row ``i * n + j`` is sample j of prompt i."""

    tokens: np.ndarray  # [N, max_new] int32, pad id after each row's end
    lengths: np.ndarray  # [N] int32, generated tokens including the stop id / stop string
    # [N, max_new] fp32: each sampled token's log-prob (at the temperature the call's
    # SamplingParams.logprob_temperature names); 0 after the end
    logprobs: np.ndarray
    prompt_lengths: np.ndarray  # [N] int32
    finish_reasons: tuple[str, ...]  # "stop" (stop id or string) or "length"
    texts: tuple[str, ...] | None  # decoded completions (special tokens skipped) when a tokenizer is given
    stats: SamplerStats

    @property
    def mask(self) -> np.ndarray:
        """[N, max_new] bool: the position holds a generated token."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]
