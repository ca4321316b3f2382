"""Batched sampling from the Qwen2 decoder: jitted prefill + ``while_loop`` decode over a KV cache."""

from grouprank_jax.sampling.batch import prompt_buckets
from grouprank_jax.sampling.output import SamplerOutput, SamplerStats
from grouprank_jax.sampling.params import SamplingParams
from grouprank_jax.sampling.sampler import Sampler

__all__ = ["Sampler", "SamplerOutput", "SamplerStats", "SamplingParams", "prompt_buckets"]
