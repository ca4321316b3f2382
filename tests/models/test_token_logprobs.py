"""The blockwise LM-head log-probs equal the naive full-logits computation (values and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.models.token_logprobs import naive_token_logprobs, token_logprobs


@pytest.mark.parametrize("n_tokens,chunk", [(37, 8), (64, 64), (50, 1024)])
def test_blockwise_matches_naive(n_tokens, chunk):
    rng = np.random.default_rng(n_tokens)
    head = jnp.asarray(rng.standard_normal((16, 300)) * 0.3, jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((2, n_tokens // 2 + 1, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, hidden.shape[:2]), jnp.int32)
    logp, ent = token_logprobs(head, hidden, targets, chunk)
    ref_logp, ref_ent = naive_token_logprobs(head, hidden, targets)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)

    def loss(fn, h, w):
        return jnp.sum(fn(w, h, targets)[0] * jnp.linspace(0.1, 1.0, targets.size).reshape(targets.shape))

    g_block = jax.grad(lambda h, w: loss(lambda w_, h_, t: token_logprobs(w_, h_, t, chunk), h, w), argnums=(0, 1))(
        hidden, head
    )
    g_naive = jax.grad(lambda h, w: loss(naive_token_logprobs, h, w), argnums=(0, 1))(hidden, head)
    for a, b in zip(g_block, g_naive):
        np.testing.assert_allclose(a, b, atol=1e-5)


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
