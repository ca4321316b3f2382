"""The chunked (online-softmax) attention equals the reference and stays small at long context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.config import MeshConfig, model_preset
from grouprank_jax.models import create_model
from grouprank_jax.models.attention import (
    MASK_VALUE,
    chunked_attention,
    reference_attention,
    shared_prefix_decode_attention,
)
from grouprank_jax.models.flash import attention_with_lse
from grouprank_jax.models.prefix_attention import shared_prefix_attention
from grouprank_jax.parallel.mesh import make_mesh, use_mesh
from grouprank_jax.preflight.topology import parse_topology, topology_devices


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
        seg[:, t // 3 :] = 2
        seg[:, 2 * t // 3 :] = 3
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


@pytest.mark.parametrize("keys_left", [None, True, False])
@pytest.mark.parametrize("rollouts", [1, 3])
def test_shared_prefix_decode_equals_reference_over_each_rows_own_copy(rollouts, keys_left):
    """G rollouts reading one prompt KV + their own suffix = softmax over [prompt copy, suffix],
    with the prefix scores as keys @ queries (CPU's default, None here) and as queries @ keys."""
    rng = np.random.default_rng(rollouts)
    b, g, n, kv_heads, h, p, s = 2, rollouts, 8, 2, 16, 13, 6
    r = b * g
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q = normal(r, 1, n, h)
    prefix_k, prefix_v = normal(b, p, kv_heads, h), normal(b, p, kv_heads, h)
    suffix_k, suffix_v = normal(r, s, kv_heads, h), normal(r, s, kv_heads, h)
    prefix_valid = np.ones((b, p), bool)
    prefix_valid[1, :5] = False  # prompt 1 is left-padded
    written = rng.integers(1, s + 1, size=r)  # rows have written different numbers of suffix slots
    suffix_valid = np.arange(s)[None, :] < written[:, None]
    heads_first = lambda x: x.swapaxes(1, 2)  # the caches' [rows, K, slots, H] layout
    got = shared_prefix_decode_attention(
        q,
        heads_first(prefix_k),
        heads_first(prefix_v),
        jnp.asarray(prefix_valid),
        heads_first(suffix_k),
        heads_first(suffix_v),
        jnp.asarray(suffix_valid),
        keys_left=keys_left,
    )
    # Reference: every row holds its own copy of its prompt, followed by its suffix.
    k = jnp.concatenate([jnp.repeat(prefix_k, g, axis=0), suffix_k], axis=1)
    v = jnp.concatenate([jnp.repeat(prefix_v, g, axis=0), suffix_v], axis=1)
    valid = jnp.concatenate([jnp.repeat(jnp.asarray(prefix_valid), g, axis=0), jnp.asarray(suffix_valid)], axis=1)
    slots = jnp.arange(p + s, dtype=jnp.int32)
    want = reference_attention(q, k, v, jnp.full((r, 1), p + s, jnp.int32), slots, valid)
    err = float(jnp.abs(got - want).max())
    assert err <= 1e-5, err


def test_shared_prefix_decode_puts_keys_left_only_on_cpu():
    """The prefix scores' dot takes the prompt's keys as its left operand on CPU (no mesh, or a
    CPU mesh) and the queries on TPU (a v5p-8 topology's mesh), as on GPU."""
    b, g, kv_heads, h, p, s = 1, 4, 2, 8, 32, 4
    q = jnp.ones((b * g, 1, kv_heads, h))
    prefix, suffix = jnp.ones((b, kv_heads, p, h)), jnp.ones((b * g, kv_heads, s, h))
    args = (q, prefix, prefix, jnp.ones((b, p), bool), suffix, suffix, jnp.ones((b * g, s), bool))

    def first_dot_lhs_shape(mesh):
        with use_mesh(mesh):  # a fresh function each time: a traced program is cached per function
            jaxpr = jax.make_jaxpr(lambda *a: shared_prefix_decode_attention(*a))(*args)
        dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
        return tuple(dot.invars[0].aval.shape)

    keys = (b, kv_heads, p, h)
    assert first_dot_lhs_shape(None) == keys
    assert first_dot_lhs_shape(make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])) == keys
    assert first_dot_lhs_shape(make_mesh(MeshConfig(fsdp=-1), topology_devices(parse_topology("v5p-8")))) != keys


def _reference_with_lse(q, k, v, q_slot, kv_slot, kv_valid):
    """Full-matrix softmax attention and its log-sum-exp (the oracle of ``attention_with_lse``)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    scores = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv_heads, n // kv_heads, h), k) * h**-0.5
    visible = (kv_slot[None, None, :] <= q_slot[:, :, None]) & kv_valid[:, None, :]
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, Gq, T]
    out = jnp.einsum("bkgts,bskh->btkgh", jnp.exp(scores - lse[..., None]), v).reshape(b, t, n, h)
    return out, lse.transpose(0, 3, 1, 2).reshape(b, t, n)


@pytest.mark.parametrize("t,s,q_block,kv_block", [(37, 29, 8, 5), (16, 40, 16, 64)])
def test_attention_with_lse_values_and_gradients_equal_full_softmax(t, s, q_block, kv_block):
    """Output, LSE and the custom backward (q, k, v gradients through both outputs) against
    autodiff of the full-matrix softmax; blocks that do not divide T or S are padded."""
    rng = np.random.default_rng(t)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = normal(2, t, 4, 8), normal(2, s, 2, 8), normal(2, s, 2, 8)
    q_slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + max(s - t, 0), (2, t))  # causal, offset
    kv_valid = jnp.asarray(rng.random((2, s)) > 0.3).at[:, 0].set(True)  # every query sees a key
    w_out, w_lse = normal(2, t, 4, 8), normal(2, t, 4)
    kv_slot = jnp.arange(s, dtype=jnp.int32)

    def loss(fn):
        def total(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

        return total

    flash = lambda q, k, v: attention_with_lse(q, k, v, q_slot, kv_slot, kv_valid, q_block, kv_block)
    full = lambda q, k, v: _reference_with_lse(q, k, v, q_slot, kv_slot, kv_valid)
    for got, want in zip(flash(q, k, v), full(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    grads = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, jax.grad(loss(full), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("fused", [None, "xla"])
def test_shared_prefix_attention_equals_softmax_over_each_rows_prompt_copy(fused):
    """Whole responses of G rollouts over one prompt KV (+ causal self) = softmax attention of
    each row over its own [prompt copy, response], values and gradients (the prompt's gradient
    is the sum over its rollouts). ``fused="xla"`` is the GPU path's construction (repeated
    prompt KV + mask through ``jax.nn.dot_product_attention``) with XLA's kernel instead of
    cuDNN's, which exists only on a GPU."""
    rng = np.random.default_rng(7)
    b, g, n, kv_heads, h, p, c = 2, 3, 4, 2, 8, 11, 6
    r = b * g
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = normal(r, c, n, h), normal(r, c, kv_heads, h), normal(r, c, kv_heads, h)
    pk, pv = normal(b, p, kv_heads, h), normal(b, p, kv_heads, h)
    prefix_valid = jnp.asarray(np.arange(p)[None, :] >= np.array([[0], [4]]))  # prompt 1 left-padded
    lengths = rng.integers(1, c + 1, size=r)
    lengths[-1] = 0  # an empty response: its rows see the prompt only
    suffix_valid = jnp.asarray(np.arange(c)[None, :] < lengths[:, None])
    w = normal(r, c, n, h)

    def shared(q, k, v, pk, pv):
        return shared_prefix_attention(q, k, v, pk, pv, prefix_valid, suffix_valid, 4, 4, fused=fused)

    def copies(q, k, v, pk, pv):
        keys = jnp.concatenate([jnp.repeat(pk, g, axis=0), k], axis=1)
        values = jnp.concatenate([jnp.repeat(pv, g, axis=0), v], axis=1)
        valid = jnp.concatenate([jnp.repeat(prefix_valid, g, axis=0), suffix_valid], axis=1)
        q_slot = jnp.broadcast_to(p + jnp.arange(c, dtype=jnp.int32), (r, c))
        return reference_attention(q, keys, values, q_slot, jnp.arange(p + c, dtype=jnp.int32), valid)

    args = (q, k, v, pk, pv)
    np.testing.assert_allclose(shared(*args), copies(*args), atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)
    for got, want in zip(
        jax.grad(loss(shared), argnums=range(5))(*args), jax.grad(loss(copies), argnums=range(5))(*args)
    ):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_shared_prefix_update_takes_cudnn_where_full_attention_does(monkeypatch):
    """The policy update's response attention follows ``attention_impl``: cuDNN over prompt
    copies on a GPU (auto or cudnn), the blockwise kernel elsewhere or when chunked is asked."""
    from grouprank_jax.models import prefix_attention

    assert prefix_attention.prefix_attention_fused("auto") is None  # this CPU
    monkeypatch.setattr(prefix_attention, "mesh_platform", lambda mesh: "gpu")
    assert prefix_attention.prefix_attention_fused("auto") == "cudnn"
    assert prefix_attention.prefix_attention_fused("cudnn") == "cudnn"
    assert prefix_attention.prefix_attention_fused("chunked") is None


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


@pytest.mark.parametrize("t", [100, 300])  # not multiples of the 128 tile
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (7, 1)])  # GQA ratios 1 and 7
@pytest.mark.parametrize("packed", [False, True])
def test_splash_interpret_equals_reference_forward_and_gradients(t, heads, kv_heads, packed):
    """The Pallas splash kernel (interpret mode: the same kernel code, run on CPU) with left
    padding, packing and GQA: outputs within 1e-5 of the einsum reference, gradients within 1e-4."""
    from grouprank_jax.models.attention import splash_attention

    rng = np.random.default_rng(t + heads)
    q, k, v, slot, kv_slot, valid, seg = _inputs(rng, 3, t, heads, kv_heads, 32, pad=[0, 11, t // 3], packed=packed)
    keep = jnp.asarray(valid)[:, :, None, None]  # padded query rows are ignored downstream
    weights = jnp.asarray(rng.standard_normal((t, heads, 32)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(keep, fn(q, k, v) * weights, 0.0))

    ref = lambda q, k, v: reference_attention(q, k, v, slot, kv_slot, valid, seg, seg)
    spl = lambda q, k, v: splash_attention(q, k, v, slot, kv_slot, valid, seg, seg, block_size=128, interpret=True)
    out_ref, out_spl = jax.jit(ref)(q, k, v), jax.jit(spl)(q, k, v)
    assert np.abs(np.asarray(out_ref) - np.asarray(out_spl))[np.asarray(valid)].max() <= 1e-5
    g_ref = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, k, v)
    g_spl = jax.jit(jax.grad(lambda *a: loss(spl, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_ref, g_spl):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)


def test_model_forward_with_splash_equals_reference_on_a_mesh():
    """The whole model with ``attention_impl: splash`` (interpret mode) on an 8-device mesh, the
    kernel inside shard_map (rows over fsdp, heads over tensor), equals ``reference``."""
    from grouprank_jax.weights.loading import rebuild_with_config

    cfg = model_preset("tiny-smallvocab")
    model = create_model(cfg.replace(attention_impl="reference"), seed=4)
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(3, 500, (4, 45)))
    mask = np.ones((4, 45), np.int32)
    mask[1, :13] = 0
    want = np.asarray(model(ids, attention_mask=mask))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    splash = rebuild_with_config(model, cfg.replace(attention_impl="splash", splash_interpret=True), mesh, 0)
    got = np.asarray(jax.jit(lambda i, m: splash(i, attention_mask=m))(ids, mask))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-5
