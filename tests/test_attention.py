"""The chunked (online-softmax) attention equals the reference and stays small at long context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model
from grouprank_jax.models.attention import chunked_attention, reference_attention


def _inputs(rng, b, t, n, k, h, pad, packed):
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    valid = np.ones((b, t), bool)
    for row, p in enumerate(pad):
        valid[row, :p] = False  # left padding
    seg = None
    if packed:
        seg = np.ones((b, t), np.int32)
        seg[:, t // 3:] = 2
        seg[:, 2 * t // 3:] = 3
        seg = jnp.asarray(np.where(valid, seg, 0))
    slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return q, kk, v, slot, jnp.arange(t, dtype=jnp.int32), jnp.asarray(valid), seg


@pytest.mark.parametrize("t,block", [(37, 8), (100, 32), (129, 64)])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_equals_reference(t, block, packed):
    rng = np.random.default_rng(t + block)
    q, k, v, slot, kv_slot, valid, seg = _inputs(rng, 3, t, 8, 2, 16, pad=[0, 5, t // 2], packed=packed)
    ref = reference_attention(q, k, v, slot, kv_slot, valid, seg, seg)
    got = chunked_attention(q, k, v, slot, kv_slot, valid, seg, seg, block_size=block)
    keep = np.asarray(valid)  # padded query rows are ignored downstream
    err = np.abs(np.asarray(ref) - np.asarray(got))[keep].max()
    assert err <= 1e-5, err


def _forward_temp_bytes(impl, t):
    cfg = model_preset("tiny-smallvocab", num_layers=1, attention_impl=impl, attention_block_size=512)
    model = create_model(cfg)
    from flax import nnx

    graphdef, state = nnx.split(model)

    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids, return_hidden=True)

    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(fwd).lower(state, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_far_below_reference_at_16k():
    """A 16k-token forward: reference materialises [heads, T, T] fp32 scores (4 x 16k x 16k x 4 B
    = 4 GiB, plus the probabilities); chunked keeps [heads, T, block] per step."""
    t = 16384
    chunked = _forward_temp_bytes("chunked", t)
    reference = _forward_temp_bytes("reference", t)
    print(f"temp bytes at T={t}: chunked={chunked / 2**20:.1f} MiB, reference={reference / 2**20:.1f} MiB")
    assert reference >= 4 * 2**30
    assert chunked * 20 < reference
