"""Metrics vs oracles: pytrec_eval (NDCG, Recall), scipy (JS, KL), a plain-numpy RBO reference."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.task import metrics

PAD = 20
NUM_CASES = 1200


def _random_cases(seed: int, graded: bool):
    """Random groups of 1..20 docs with ties, numeric and alphabetic docids, partial judgments."""
    rng = np.random.default_rng(seed)
    cases = []
    for case in range(NUM_CASES):
        n = int(rng.integers(1, PAD + 1))
        pool = [str(x) for x in rng.choice(200, size=n, replace=False)]
        docids = [d if rng.random() < 0.5 else f"d{d}" for d in pool]  # "9" > "10" as strings
        scores = rng.integers(0, 5, size=n).astype(np.float32) / 4  # few values: many ties
        grades = rng.integers(0, 4 if graded else 2, size=n)
        retrieved = rng.random(n) < 0.85
        judged = rng.random(n) < 0.85
        retrieved[rng.integers(n)] = True
        first_judged = int(rng.integers(n))
        judged[first_judged] = True
        cases.append((f"q{case}", docids, scores, grades, retrieved, judged))
    return cases


def _pad(values, fill, dtype):
    out = np.full((PAD,), fill, dtype)
    out[: len(values)] = values
    return out


def _jax_inputs(cases):
    batch = {"scores": [], "gains": [], "retrieved": [], "judged": [], "tie_key": []}
    for _, docids, scores, grades, retrieved, judged in cases:
        string_rank = np.argsort(np.argsort(np.array(docids)))  # ascending string order
        batch["scores"].append(_pad(scores, 0.0, np.float32))
        batch["gains"].append(_pad(grades, 0, np.int32))
        batch["retrieved"].append(_pad(retrieved, False, bool))
        batch["judged"].append(_pad(judged, False, bool))
        batch["tie_key"].append(_pad(string_rank, -1, np.float32))
    return {k: jnp.asarray(np.stack(v)) for k, v in batch.items()}


def _trec_eval(cases, measures, relevance_level=1):
    import pytrec_eval

    qrels = {q: {d: int(g) for d, g, j in zip(ids, grades, judged) if j} for q, ids, _, grades, _, judged in cases}
    run = {q: {d: float(s) for d, s, r in zip(ids, scores, ret) if r} for q, ids, scores, _, ret, _ in cases}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(measures), relevance_level=relevance_level)
    return evaluator.evaluate(run)


@pytest.mark.parametrize("graded", [True, False])
def test_ndcg_and_recall_match_pytrec_eval(graded):
    cases = _random_cases(seed=1 + graded, graded=graded)
    x = _jax_inputs(cases)
    ks = (1, 3, 5, 10, 20, 30)  # 30 > PAD: cutoffs beyond the group
    measures = [f"ndcg_cut.{k}" for k in ks] + [f"recall.{k}" for k in ks]
    oracle = _trec_eval(cases, measures)
    assert len(oracle) == NUM_CASES
    worst = 0.0
    for k in ks:
        args = (x["scores"], x["gains"], x["retrieved"], x["judged"], x["tie_key"])
        ndcg = jax.jit(jax.vmap(lambda *a, k=k: metrics.ndcg_at_k(*a, k=k)))(*args)
        recall = jax.jit(jax.vmap(lambda *a, k=k: metrics.recall_at_k(*a, k=k)))(*args)
        want_ndcg = np.array([oracle[c[0]][f"ndcg_cut_{k}"] for c in cases])
        want_recall = np.array([oracle[c[0]][f"recall_{k}"] for c in cases])
        worst = max(worst, np.abs(ndcg - want_ndcg).max(), np.abs(recall - want_recall).max())
        np.testing.assert_allclose(ndcg, want_ndcg, atol=1e-6, rtol=0)
        np.testing.assert_allclose(recall, want_recall, atol=1e-6, rtol=0)
    print(f"max |err| vs pytrec_eval (graded={graded}): {worst:.2e}")


def test_recall_relevance_level_matches_pytrec_eval():
    cases = _random_cases(seed=7, graded=True)
    x = _jax_inputs(cases)
    oracle = _trec_eval(cases, ["recall.10"], relevance_level=2)
    got = jax.vmap(lambda *a: metrics.recall_at_k(*a, k=10, relevance_level=2))(
        x["scores"], x["gains"], x["retrieved"], x["judged"], x["tie_key"]
    )
    want = np.array([oracle[c[0]]["recall_10"] for c in cases])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_ties_follow_descending_docid_like_trec_eval():
    # Equal scores: "c" > "b" > "a" as strings, so c ranks first; only c is relevant.
    scores = jnp.ones(3)
    gains = jnp.array([0, 0, 1])  # a, b, c
    tie_key = jnp.array([0.0, 1.0, 2.0])  # ascending string order of a, b, c
    everything = jnp.ones(3, bool)
    assert float(metrics.ndcg_at_k(scores, gains, everything, everything, tie_key, k=1)) == 1.0
    assert float(metrics.recall_at_k(scores, gains, everything, everything, tie_key, k=1)) == 1.0


def _reference_rbo(pred_order, gold_order, depth, p):
    """Textbook finite-depth RBO from ordered lists and set intersections, normalised to 1."""
    total = 0.0
    for d in range(1, depth + 1):
        total += p ** (d - 1) * len(set(pred_order[:d]) & set(gold_order[:d])) / d
    return total * (1 - p) / (1 - p**depth)


@pytest.mark.parametrize("p", [0.9, 0.5])
def test_rbo_matches_numpy_reference(p):
    rng = np.random.default_rng(11)
    worst = 0.0
    pred_pos, gold_pos, depths, want = [], [], [], []
    for _ in range(1000):
        n = int(rng.integers(1, PAD + 1))
        gold_order = list(rng.permutation(n))
        pred_order = [d for d in rng.permutation(n) if rng.random() < 0.8]  # some docs missing
        want.append(_reference_rbo(pred_order, gold_order, n, p))
        pp = np.full(PAD, PAD, np.int32)
        pp[pred_order] = np.arange(len(pred_order))
        gp = np.full(PAD, PAD, np.int32)
        gp[gold_order] = np.arange(n)
        pred_pos.append(pp)
        gold_pos.append(gp)
        depths.append(n)
    got = jax.jit(jax.vmap(lambda a, b, d: metrics.rbo(a, b, d, p)))(
        jnp.asarray(np.stack(pred_pos)), jnp.asarray(np.stack(gold_pos)), jnp.asarray(depths)
    )
    worst = np.abs(np.asarray(got) - np.array(want)).max()
    print(f"max |err| RBO vs numpy reference (p={p}): {worst:.2e}")
    assert worst < 1e-6


def test_rbo_identical_is_one_and_disjoint_prefix_lower():
    pos = jnp.arange(PAD)
    assert abs(float(metrics.rbo(pos, pos, jnp.int32(PAD))) - 1.0) < 1e-6
    assert float(metrics.rbo(pos, pos[::-1], jnp.int32(PAD))) < 0.5


def _random_distributions(rng, with_zeros):
    n = int(rng.integers(1, PAD + 1))
    p, q = rng.random(n), rng.random(n)
    if with_zeros:
        p[rng.random(n) < 0.3] = 0.0
        q[rng.random(n) < 0.3] = 0.0
    p[rng.integers(n)] += 0.1  # never all-zero
    q[rng.integers(n)] += 0.1
    return n, (p / p.sum()).astype(np.float32), (q / q.sum()).astype(np.float32)


def test_js_and_kl_match_scipy():
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import entropy

    rng = np.random.default_rng(5)
    rows = [_random_distributions(rng, with_zeros=i % 2 == 0) for i in range(1000)]
    p = np.stack([_pad(r[1], 0.0, np.float32) for r in rows])
    q = np.stack([_pad(r[2], 0.0, np.float32) for r in rows])
    mask = np.stack([_pad(np.ones(r[0], bool), False, bool) for r in rows])
    js = np.asarray(jax.jit(jax.vmap(metrics.js_divergence))(p, q, mask))
    kl = np.asarray(jax.jit(jax.vmap(metrics.kl_divergence))(p, q, mask))
    want_js = np.array([jensenshannon(r[1].astype(np.float64), r[2].astype(np.float64), base=2) ** 2 for r in rows])
    want_kl = np.array([entropy(r[1].astype(np.float64), r[2].astype(np.float64), base=2) for r in rows])
    assert np.all((js >= 0) & (js <= 1))
    np.testing.assert_allclose(js, want_js, atol=1e-6, rtol=0)
    finite = np.isfinite(want_kl)
    assert np.all(np.isinf(kl[~finite])) and (~finite).sum() > 50
    kl_err = np.abs(kl[finite] - want_kl[finite]) / np.maximum(1.0, np.abs(want_kl[finite]))
    print(f"max |err| JS vs scipy: {np.abs(js - want_js).max():.2e}; KL (rel. to max(1,|KL|)): {kl_err.max():.2e}")
    assert kl_err.max() < 1e-6


def test_normalizations():
    mask = jnp.array([True, True, True, False])
    uniform = metrics.normalize_sum(jnp.zeros(4), mask, 1e-6)
    np.testing.assert_allclose(uniform, [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-7)
    soft = metrics.normalize_softmax(jnp.array([0.0, 1.0, 2.0, 99.0]), mask, temperature=1.0)
    np.testing.assert_allclose(soft[:3], np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum(), atol=1e-6)
    assert float(soft[3]) == 0.0
