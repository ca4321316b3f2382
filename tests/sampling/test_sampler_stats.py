"""Statistical checks of the pure sampling op: allowed support and frequencies.

20,000 draws per case from a fixed 8-token distribution. Bound: every token count lies within
5 binomial standard deviations of its expectation (plus 1 for discreteness); a correct sampler
fails this with probability < 1e-5 per case. Tokens outside the filtered support never appear.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.sampling import ops
from grouprank_jax.sampling.batch import prompt_buckets

DRAWS = 20_000
LOGITS = np.log(np.asarray([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02]))  # sorted, no ties


def _expected(temperature, top_k, top_p):
    """The reference distribution, computed independently of ops.py (numpy, float64)."""
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    keep = np.ones_like(p, bool)
    order = np.argsort(-p)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        mass = 0.0
        for i in order:
            if not keep[i]:
                continue
            if mass >= top_p:
                keep[i] = False
            mass += q[i]
    out = np.where(keep, p, 0.0)
    return out / out.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (0.7, 5, 0.8), (0.3, 0, 0.8)],
)
def test_filtered_sampling_frequencies(temperature, top_k, top_p):
    keys = jax.random.split(jax.random.key(1234), DRAWS)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (DRAWS, LOGITS.size))  # [N, V]
    draw = jax.jit(ops.sample_tokens, static_argnames=("greedy", "top_k", "use_top_p"))
    tokens = np.asarray(draw(logits, keys, temperature, top_p, greedy=False, top_k=top_k, use_top_p=top_p < 1.0))
    want = _expected(temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=LOGITS.size)
    assert (counts[want == 0] == 0).all(), f"filtered-out tokens drawn: {counts} vs support {want > 0}"
    bound = 5 * np.sqrt(DRAWS * want * (1 - want)) + 1
    assert (np.abs(counts - DRAWS * want) <= bound).all(), f"counts {counts} vs expected {DRAWS * want}"


def test_two_level_draw_large_vocab():
    """The block path with padding (1000 = 7 blocks of 128 + 104) and excluded (-inf) entries: 40
    allowed tokens spread over several blocks, including the padded last block."""
    vocab = 1000
    allowed = np.arange(3, vocab, 25)  # 40 tokens, the last (978) in the padded block
    p = np.zeros(vocab)
    p[allowed] = np.linspace(1.0, 3.0, allowed.size)
    p /= p.sum()
    logits = np.where(p > 0, np.log(np.maximum(p, 1e-30)), -np.inf).astype(np.float32)
    keys = jax.random.split(jax.random.key(7), DRAWS)
    tokens = np.asarray(jax.jit(ops.categorical)(keys, jnp.broadcast_to(jnp.asarray(logits), (DRAWS, vocab))))
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[p == 0].sum() == 0, "an excluded token was drawn"
    bound = 5 * np.sqrt(DRAWS * p * (1 - p)) + 1
    assert (np.abs(counts - DRAWS * p) <= bound).all()


def _sorted_nucleus(logits, top_p):
    """``[B, V]`` bool: the top-p set by the textbook rule, numpy float64: sort by probability (ties by
    lower token id), keep a token while the mass ranked strictly before it is < top_p."""
    keep = np.zeros(logits.shape, bool)
    for row, x in enumerate(np.asarray(logits, np.float64)):
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.lexsort((np.arange(p.size), -p))
        before = np.cumsum(p[order]) - p[order]
        keep[row, order[before < top_p]] = True
    return keep


def test_sort_free_nucleus_equals_the_sorted_rule():
    """``nucleus_keep`` (bisection on the threshold, no sort) keeps exactly the sorted rule's set,
    including probabilities tied at the boundary (rounded logits, all-equal rows)."""
    rng = np.random.default_rng(0)
    keep = jax.jit(ops.nucleus_keep)
    for case in range(24):
        vocab = int(rng.integers(5, 3000))
        logits = rng.normal(size=(4, vocab)) * rng.uniform(0.1, 5.0)
        if case % 3 == 0:
            logits = np.round(logits)  # many exact ties
        if case % 4 == 0:
            logits[1] = 0.0  # a row of equal probabilities: the cut falls inside the tie
        logits = logits.astype(np.float32)
        top_p = float(rng.uniform(0.05, 1.0))
        if case % 6 == 5:  # a flat distribution cut below its rarest token: every token is kept
            logits = (logits * 0.1).astype(np.float32)
            p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
            top_p = float(1.0 - 0.5 * (p / p.sum(-1, keepdims=True)).min())
        got = np.asarray(keep(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(got, _sorted_nucleus(logits, top_p), err_msg=f"case {case}, top_p {top_p}")


@pytest.mark.parametrize("top_p", [0.5, 0.8])
def test_nucleus_draw_window_and_full_search_frequencies(top_p):
    """At top_p 0.8 half the rows have their nucleus inside a 3-token window (drawn from the sorted
    window) and half (a flatter temperature) need the full-vocabulary search; at 0.5 every row's
    nucleus fits the window. Each half matches the reference
    frequencies, and a row's token is the same when it is drawn alone. The vocabulary is shuffled
    so that token order and probability order differ."""
    shuffle = np.asarray([3, 1, 6, 0, 7, 2, 5, 4])  # token t has the probability of LOGITS[shuffle[t]]
    logits = np.stack([LOGITS[shuffle] * (3.0 if r % 2 else 1.0) for r in range(DRAWS)]).astype(np.float32)
    keys = jax.random.split(jax.random.key(99), DRAWS)
    draw = jax.jit(ops.nucleus_draw, static_argnames=("window",))
    tokens = np.asarray(draw(jnp.asarray(logits), keys, top_p, window=3))
    for parity, temperature in ((0, 1.0), (1, 1.0 / 3.0)):
        want = _expected(temperature, 0, top_p)[shuffle]
        counts = np.bincount(tokens[parity::2], minlength=LOGITS.size)
        n = DRAWS // 2
        assert (counts[want == 0] == 0).all(), f"filtered-out tokens drawn: {counts} vs support {want > 0}"
        bound = 5 * np.sqrt(n * want * (1 - want)) + 1
        assert (np.abs(counts - n * want) <= bound).all(), f"counts {counts} vs expected {n * want}"
    alone = [int(draw(jnp.asarray(logits[r : r + 1]), keys[r : r + 1], top_p, window=3)[0]) for r in range(20)]
    np.testing.assert_array_equal(alone, tokens[:20])


def test_greedy_and_logprobs_and_stop_sequences():
    logits = jnp.asarray([LOGITS, LOGITS[::-1]], jnp.float32)  # [2, V]
    keys = jax.random.split(jax.random.key(0), 2)
    tok = ops.sample_tokens(logits, keys, 1.0, 1.0, greedy=True)
    np.testing.assert_array_equal(tok, [0, 7])
    np.testing.assert_allclose(ops.token_logprobs(logits, tok), np.log([0.30, 0.30]), rtol=1e-6)
    recent = jnp.asarray([[5, 6, 7], [1, 6, 7], [7, 6, 5]])  # [B, W]
    seqs = jnp.asarray([[-1, 6, 7], [9, 9, 5]])  # "6 7" and "9 9 5"
    np.testing.assert_array_equal(ops.match_stop_sequences(recent, seqs), [True, True, False])
    assert not ops.match_stop_sequences(recent, jnp.zeros((0, 0), jnp.int32)).any()


def test_first_argmax_and_token_logprobs_match_the_textbook_ops():
    """The decode step's argmax (max + masked min) and log-prob (logit - logsumexp) equal
    ``jnp.argmax`` and ``log_softmax`` + take, including exact ties (first index wins), NaNs (the
    first NaN, as ``jnp.argmax``) and the last index."""
    x = np.random.default_rng(0).normal(size=(6, 1000)).astype(np.float32) * 4
    x[1, [10, 500]] = 99.0
    x[2, [7, 3]] = np.nan
    x[3, :] = -np.inf
    x[4, -1] = 50.0
    x[5, ::2] = 30.0
    want = np.asarray([int(jnp.argmax(jnp.asarray(row))) for row in x])
    got = np.asarray(jax.jit(ops.first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want[[1, 2, 4, 5]], [10, 3, 999, 0])
    finite = jnp.asarray(x[[0, 1, 4, 5]])
    tokens = jnp.asarray([5, 10, 999, 1])
    greedy_tokens = jnp.asarray(want[[0, 1, 4, 5]])
    for temperature in (1.0, 0.7):

        def textbook(toks, t=temperature):
            return jnp.take_along_axis(jax.nn.log_softmax(finite / t, axis=-1), toks[:, None], axis=-1)[:, 0]

        got = ops.token_logprobs(finite, tokens, temperature)
        np.testing.assert_allclose(got, textbook(tokens), rtol=1e-6, atol=1e-6)
        # The decode step's fused greedy op: the same token and log-prob as the two ops apart.
        got_tokens, got_lp = jax.jit(ops.greedy_tokens_and_logprobs)(jnp.asarray(x), temperature)
        np.testing.assert_array_equal(got_tokens, want)
        got_lp = np.asarray(got_lp)
        np.testing.assert_allclose(got_lp[[0, 1, 4, 5]], textbook(greedy_tokens), rtol=1e-6, atol=1e-6)
        assert np.isnan(got_lp[2]), "a row holding a NaN gets a NaN log-prob"


def test_prompt_buckets():
    assert prompt_buckets(1000) == (64, 128, 256, 512, 1000)
    assert prompt_buckets(64) == (64,)
