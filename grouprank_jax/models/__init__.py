"""The Qwen2 decoder, its KV cache and attention kernels."""

from grouprank_jax.models.build import create_model, shard_model, state_shardings
from grouprank_jax.models.kv_cache import KVCache
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM

__all__ = ["KVCache", "Qwen2ForCausalLM", "create_model", "shard_model", "state_shardings"]
