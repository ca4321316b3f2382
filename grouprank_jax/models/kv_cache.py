"""The dense, preallocated KV caches the sampler drives.

``KVCache`` holds one ``[batch, kv_heads, slots, head_dim]`` array per layer (a tuple, not one
stacked ``[layers, ...]`` array): inside the decode ``while_loop`` a layer then reads its own
buffer, whereas slicing a layer out of a stacked cache made XLA copy that layer's whole cache
every step (seen on CPU as one ``slice`` fusion per layer per step). The cache is donated to the
jitted decode loop and updated in place. Heads before slots: a decode step's attention is then a
batched matmul over (batch, kv_head) that reads each head's ``[slots, head_dim]`` slab where it
lies; with slots before heads XLA copied the layer's whole cache into that order every step
(CPU, 16 rows x 2,048 slots x 4 heads of 64: 34 ms per layer vs 5 ms).

Protocol (what ``Qwen2ForCausalLM.__call__`` does with a cache):
- a call with T > 1 tokens is a *prefill*: it must start at ``index == 0``; it writes slots
  ``[0, T)``, marks them valid where ``attention_mask`` is 1 (left padding stays invalid), and
  attends within those T tokens (so fused prefill kernels apply);
- a call with T == 1 is a *decode step*: it writes slot ``index`` for every row (rows decode in
  lockstep) and attends over every valid slot ``<= index``, plus, when a ``PrefixKV`` is given,
  over that row's shared prompt (``attention.shared_prefix_decode_attention``);
- both return the cache with ``index`` advanced by T.

``PrefixKV`` is a prefilled prompt cache that G rollouts share: ``[prompts, K, P, H]`` per layer,
read-only during decode, while each rollout row writes only its own suffix ``KVCache``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, named_sharding

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")  # one layer's K or V
VALID_AXES = ("cache_batch", "cache_length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, kv_heads, slots, head_dim]
    v: tuple[jax.Array, ...]  # per layer [batch, kv_heads, slots, head_dim]
    valid: jax.Array  # [batch, slots] bool: the slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def init(cls, num_layers, batch, slots, kv_heads, head_dim, dtype=jnp.float32, mesh=None, rules=LOGICAL_AXIS_RULES):
        shape = (batch, kv_heads, slots, head_dim)
        valid = jnp.zeros((batch, slots), bool)

        def put(x, names):
            if mesh is None or mesh.size == 1:
                return x
            return jax.device_put(x, named_sharding(mesh, names, x.shape, rules))

        k = tuple(put(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(num_layers))
        v = tuple(put(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(num_layers))
        return cls(k=k, v=v, valid=put(valid, VALID_AXES), index=jnp.zeros((), jnp.int32))

    def repeat(self, n: int) -> KVCache:
        """Each row repeated ``n`` times consecutively (row i -> rows i*n .. i*n+n-1): the
        per-row layout, where every rollout holds its own copy of the prompt."""
        if n == 1:
            return self
        return KVCache(
            k=tuple(jnp.repeat(x, n, axis=0) for x in self.k),
            v=tuple(jnp.repeat(x, n, axis=0) for x in self.v),
            valid=jnp.repeat(self.valid, n, axis=0),
            index=self.index,
        )

    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in self.k + self.v) + self.valid.size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixKV:
    """A prompt's keys/values, stored once and read by all of its rollouts."""

    k: tuple[jax.Array, ...]  # per layer [prompts, kv_heads, prompt_slots, head_dim]
    v: tuple[jax.Array, ...]  # per layer [prompts, kv_heads, prompt_slots, head_dim]
    valid: jax.Array  # [prompts, prompt_slots] bool (left padding is False)

    @classmethod
    def from_cache(cls, cache: KVCache) -> PrefixKV:
        """A prefilled cache (its every slot written) as a shared prefix."""
        return cls(k=cache.k, v=cache.v, valid=cache.valid)

    @property
    def num_prompts(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in self.k + self.v) + self.valid.size)
