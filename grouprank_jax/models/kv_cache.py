"""The dense, preallocated KV cache the sampler drives.

One pytree for all layers (stacked on a leading ``layers`` axis) so the whole cache can be
donated to the jitted decode loop and updated in place.

Protocol (what ``Qwen2ForCausalLM.__call__`` does with a cache):
- a call with T > 1 tokens is a *prefill*: it must start at ``index == 0``; it writes slots
  ``[0, T)``, marks them valid where ``attention_mask`` is 1 (left padding stays invalid), and
  attends within those T tokens (so fused prefill kernels apply);
- a call with T == 1 is a *decode step*: it writes slot ``index`` for every row (rows decode in
  lockstep) and attends over every valid slot ``<= index``;
- both return the cache with ``index`` advanced by T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, named_sharding

CACHE_AXES = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    valid: jax.Array  # [batch, slots] bool: the slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def init(cls, num_layers, batch, slots, kv_heads, head_dim, dtype=jnp.float32, mesh=None, rules=LOGICAL_AXIS_RULES):
        shape = (num_layers, batch, slots, kv_heads, head_dim)
        k = jnp.zeros(shape, dtype)
        v = jnp.zeros(shape, dtype)
        valid = jnp.zeros((batch, slots), bool)
        if mesh is not None and mesh.size > 1:
            sharding = named_sharding(mesh, CACHE_AXES, shape, rules)
            k = jax.device_put(k, sharding)
            v = jax.device_put(v, sharding)
            valid = jax.device_put(valid, named_sharding(mesh, ("cache_batch", "cache_length"), valid.shape, rules))
        return cls(k=k, v=v, valid=valid, index=jnp.zeros((), jnp.int32))

    def repeat(self, n: int) -> KVCache:
        """Each row repeated ``n`` times consecutively (row i -> rows i*n .. i*n+n-1): one prefill
        serves the n rollouts of a prompt."""
        if n == 1:
            return self
        return KVCache(
            k=jnp.repeat(self.k, n, axis=1),
            v=jnp.repeat(self.v, n, axis=1),
            valid=jnp.repeat(self.valid, n, axis=0),
            index=self.index,
        )

    def nbytes(self) -> int:
        return int(self.k.size * self.k.dtype.itemsize * 2 + self.valid.size)
