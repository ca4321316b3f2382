"""The blockwise LM-head log-probs equal the naive full-logits computation (values and grads),
with the softmax reduced batched or one row at a time (``rowwise``, single-CPU-device programs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grouprank_jax.config import model_preset
from grouprank_jax.config.mesh import MeshConfig
from grouprank_jax.models import create_model
from grouprank_jax.models.token_logprobs import (
    CPU_ROWWISE_SOFTMAX_MIN_ROWS,
    naive_token_logprobs,
    rowwise_softmax,
    token_logprobs,
)
from grouprank_jax.parallel.mesh import make_mesh
from grouprank_jax.preflight.topology import parse_topology, topology_devices
from grouprank_jax.rl.step import completion_logprobs
from grouprank_jax.sft.step import sft_loss_sums


# (37, 8): blocks of 8 rows, below CPU_ROWWISE_SOFTMAX_MIN_ROWS, so rowwise=True stays batched
@pytest.mark.parametrize("n_tokens,chunk", [(37, 8), (64, 64), (100, 32), (50, 1024)])
@pytest.mark.parametrize("rowwise", [False, True])
def test_blockwise_matches_naive(n_tokens, chunk, rowwise):
    rng = np.random.default_rng(n_tokens)
    head = jnp.asarray(rng.standard_normal((16, 300)) * 0.3, jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((2, n_tokens // 2 + 1, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, hidden.shape[:2]), jnp.int32)
    blockwise = lambda w, h, t: token_logprobs(w, h, t, chunk, rowwise=rowwise)
    logp, ent = blockwise(head, hidden, targets)
    ref_logp, ref_ent = naive_token_logprobs(head, hidden, targets)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)

    # GRPO's loss weights both outputs (its entropy bonus, entropy_coef), so both carry gradients
    w_logp = jnp.linspace(0.1, 1.0, targets.size).reshape(targets.shape)
    w_ent = jnp.linspace(-0.5, 0.7, targets.size).reshape(targets.shape)

    def loss(fn, h, w):
        lp, en = fn(w, h, targets)
        return jnp.sum(lp * w_logp) + jnp.sum(en * w_ent)

    g_block = jax.grad(lambda h, w: loss(blockwise, h, w), argnums=(0, 1))(hidden, head)
    g_naive = jax.grad(lambda h, w: loss(naive_token_logprobs, h, w), argnums=(0, 1))(hidden, head)
    for a, b in zip(g_block, g_naive):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_rowwise_equals_batched_at_the_real_vocabulary(with_entropy):
    """The shape the row loop is for: 256 rows x 151,936 (a GRPO/SFT block on one CPU device),
    log-probs, entropy and both gradients against the batched reduction."""
    rng = np.random.default_rng(3)
    head = jnp.asarray(rng.standard_normal((16, 151_936)) * 0.3, jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 151_936, (256,)), jnp.int32)

    def run(rowwise):
        def loss(w, h):
            lp, en = token_logprobs(w, h, targets, 1024, with_entropy=with_entropy, rowwise=rowwise)
            return jnp.sum(lp) + 0.3 * jnp.sum(en), (lp, en)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(head, hidden)

    (_, (lp_b, en_b)), g_b = run(False)
    (_, (lp_r, en_r)), g_r = run(True)
    np.testing.assert_allclose(lp_r, lp_b, rtol=1e-5, atol=1e-5)
    if with_entropy:
        np.testing.assert_allclose(en_r, en_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_r, g_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rows_are_reduced_one_at_a_time_only_on_one_cpu_device():
    assert rowwise_softmax(None)  # unsharded programs on this CPU host
    assert rowwise_softmax(make_mesh(MeshConfig(), jax.devices()[:1]))
    assert not rowwise_softmax(make_mesh(MeshConfig(data=8)))  # a loop would gather row shards
    assert not rowwise_softmax(make_mesh(MeshConfig(fsdp=-1), topology_devices(parse_topology("v5p-8"))))
    # the loop is a scan in the program only where it is asked for and the block is large enough
    head, hidden = jnp.ones((8, 64)), jnp.ones((CPU_ROWWISE_SOFTMAX_MIN_ROWS, 8))
    targets = jnp.zeros((CPU_ROWWISE_SOFTMAX_MIN_ROWS,), jnp.int32)
    program = lambda n, rowwise: str(
        jax.make_jaxpr(lambda w, h, t: token_logprobs(w, h, t, rowwise=rowwise))(head, hidden[:n], targets[:n])
    )
    assert "scan" in program(CPU_ROWWISE_SOFTMAX_MIN_ROWS, True)
    assert "scan" not in program(CPU_ROWWISE_SOFTMAX_MIN_ROWS, False)
    assert "scan" not in program(CPU_ROWWISE_SOFTMAX_MIN_ROWS - 1, True)


@pytest.mark.parametrize("chunk", [8, 1024])
def test_temperature_is_trls_log_softmax_of_logits_over_t(chunk):
    """GRPO's log-probs at sampling temperature T: TRL computes ``selective_log_softmax(logits /
    T)`` (and the entropy of that distribution); here against float64 numpy."""
    rng = np.random.default_rng(7)
    head = rng.standard_normal((16, 300)) * 0.5
    hidden = rng.standard_normal((3, 11, 16))
    targets = rng.integers(0, 300, (3, 11))
    t = 0.7
    logits = hidden @ head / t
    logits = logits - logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    want_ent = -(np.exp(logp_all) * logp_all).sum(-1)
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    logp, ent = token_logprobs(as32(head), as32(hidden), jnp.asarray(targets), chunk, temperature=t)
    np.testing.assert_allclose(logp, want, atol=2e-5)
    np.testing.assert_allclose(ent, want_ent, atol=2e-5)
    naive, _ = naive_token_logprobs(as32(head), as32(hidden), jnp.asarray(targets), temperature=t)
    np.testing.assert_allclose(naive, want, atol=2e-5)


def test_blockwise_peak_memory_is_smaller():
    """Compiled temp memory of the loss+grad at 4096 tokens x 151936 vocab: blockwise holds one
    [chunk, vocab] block; naive holds [tokens, vocab] logits (2.3 GiB in fp32) and more."""
    d, v, n = 64, 151936, 4096
    head = jax.ShapeDtypeStruct((d, v), jnp.float32)
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)

    def grad_of(fn):
        return jax.jit(jax.grad(lambda w, h, t: -jnp.sum(fn(w, h, t)[0]), argnums=(0, 1)))

    blockwise = (
        grad_of(lambda w, h, t: token_logprobs(w, h, t, 512, with_entropy=False)).lower(head, hidden, targets).compile()
    )
    naive = grad_of(naive_token_logprobs).lower(head, hidden, targets).compile()
    b = blockwise.memory_analysis().temp_size_in_bytes
    nv = naive.memory_analysis().temp_size_in_bytes
    print(f"loss+grad temp memory: blockwise {b / 2**20:.0f} MiB vs naive {nv / 2**20:.0f} MiB")
    assert nv > 2 * 2**30
    assert b * 4 < nv


@pytest.mark.parametrize("devices", [1, 8])
def test_sft_and_grpo_losses_reduce_by_row_on_one_cpu_device_only(devices):
    mesh = make_mesh(MeshConfig(fsdp=devices), jax.devices()[:devices])
    model = create_model(model_preset("tiny-smallvocab"), mesh=mesh, seed=0)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    rows, seq = 8, 24  # 8 rows x 8 completion tokens = 64 head rows, one block
    ids = jnp.ones((rows, seq), jnp.int32)
    batch = {
        "input_ids": ids,
        "targets": ids,
        "loss_mask": jnp.ones_like(ids),
        "segment_ids": jnp.ones_like(ids),
        "positions": jnp.broadcast_to(jnp.arange(seq), ids.shape),
    }
    sft = jax.make_jaxpr(lambda t, f: sft_loss_sums(t, f, graphdef, batch, chunk_size=1024))(trainable, frozen)
    grpo = jax.make_jaxpr(
        lambda t, f: completion_logprobs(t, f, graphdef, ids, jnp.ones_like(ids), 16, 1024, use_lora=False)
    )(trainable, frozen)
    for program in (sft, grpo):
        assert ("softmax_stats_by_row" in str(program)) == (devices == 1)
