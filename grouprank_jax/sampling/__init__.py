"""Batched sampling from the Qwen2 decoder: jitted prefill + ``while_loop`` decode over a KV cache."""

from grouprank_jax.sampling.params import SamplingParams
from grouprank_jax.sampling.sampler import Sampler, SamplerOutput, SamplerStats, prompt_buckets

__all__ = ["Sampler", "SamplerOutput", "SamplerStats", "SamplingParams", "prompt_buckets"]
