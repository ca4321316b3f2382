"""The reward vs an oracle assembled from pytrec_eval and scipy, plus its gates and policies."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grouprank_jax.task.reward import RewardConfig, compute_rewards

C = 12


def _random_batch(seed, batch=300):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, C + 1, size=batch)
    mask = np.arange(C)[None, :] < sizes[:, None]  # [B, C]
    pred = rng.integers(0, 11, size=(batch, C)).astype(np.float32) * mask
    gold = rng.integers(0, 11, size=(batch, C)).astype(np.float32) * mask
    valid = mask & (rng.random((batch, C)) < 0.85)
    pred = pred * valid
    status = np.zeros(batch, np.int32)
    return pred, valid, status, gold, mask


# The paper's R_G (paper-notes §3 Eq. 5), written out here rather than read from RewardConfig so
# that a changed default fails the test: NDCG@10 + 0.2 Recall@10 + 0.1 (1 - JS), "relevant" =
# gold >= 5 and epsilon 1e-6 (both INFERRED, README), invalid JSON -0.1 and bad tags -0.5 (Eq. 4).
K, RECALL_WEIGHT, ALIGNMENT_WEIGHT, RELEVANT_AT, EPSILON = 10, 0.2, 0.1, 5, 1e-6


def _oracle_group_reward(pred, valid, gold, mask):
    """NDCG/Recall from pytrec_eval, JS from scipy, docids chosen so earlier position wins ties."""
    import pytrec_eval
    from scipy.spatial.distance import jensenshannon

    qrels, run = {}, {}
    for b in range(len(pred)):
        ids = [f"{99 - i:02d}" for i in range(C)]  # descending strings = trec_eval's tie order
        qrels[f"q{b}"] = {ids[i]: int(gold[b, i]) for i in range(C) if mask[b, i]}
        run[f"q{b}"] = {ids[i]: float(pred[b, i]) for i in range(C) if valid[b, i]}
    measures = {f"ndcg_cut.{K}", f"recall.{K}"}
    ndcg_eval = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    recall_eval = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=RELEVANT_AT).evaluate(run)
    out = np.zeros(len(pred))
    for b in range(len(pred)):
        q = f"q{b}"
        ndcg = ndcg_eval[q][f"ndcg_cut_{K}"] if q in ndcg_eval else 0.0  # empty run: skipped
        recall = recall_eval[q][f"recall_{K}"] if q in recall_eval else 0.0
        m = mask[b]
        p = np.where(valid[b], pred[b], 0.0)[m] + EPSILON
        g = gold[b][m] + EPSILON
        js = jensenshannon(p / p.sum(), g / g.sum(), base=2) ** 2
        out[b] = ndcg + RECALL_WEIGHT * recall + ALIGNMENT_WEIGHT * (1 - js)
    return out


def test_group_reward_matches_oracle():
    pred, valid, status, gold, mask = _random_batch(0)
    got = compute_rewards(pred, valid, status, gold, mask, RewardConfig())
    want = _oracle_group_reward(pred, valid, gold, mask)
    np.testing.assert_allclose(np.asarray(got["group_reward"]), want, atol=1e-5)
    answered = (valid & mask).any(axis=-1)  # rows scoring no document earn the bad-JSON reward
    assert 0 < (~answered).sum() < len(pred)
    np.testing.assert_allclose(np.asarray(got["reward"]), np.where(answered, want, -0.1), atol=1e-5)
    assert set(got) >= {"reward", "ndcg", "recall", "js", "alignment", "rbo", "kl", "valid_fraction"}
    assert all(v.shape == (len(pred),) for v in got.values())


def test_format_gates():
    pred, valid, _, gold, mask = _random_batch(1, batch=6)
    status = np.array([0, 1, 2, 0, 1, 2], np.int32)
    got = np.asarray(compute_rewards(pred, valid, status, gold, mask)["reward"])
    np.testing.assert_allclose(got[[1, 4]], -0.1)
    np.testing.assert_allclose(got[[2, 5]], -0.5)
    assert np.all(got[[0, 3]] >= 0.0)


def test_perfect_prediction_scores_the_maximum():
    gold = np.array([[3, 10, 0, 7, 5, 0]], np.float32)
    mask = np.ones_like(gold, bool)
    got = compute_rewards(gold, mask, np.zeros(1, np.int32), gold, mask)
    np.testing.assert_allclose(got["ndcg"], 1.0, atol=1e-6)
    np.testing.assert_allclose(got["recall"], 1.0, atol=1e-6)
    np.testing.assert_allclose(got["js"], 0.0, atol=1e-6)
    np.testing.assert_allclose(got["reward"], 1.3, atol=1e-5)


def test_missing_policies():
    gold = np.array([[10, 8, 0, 0]], np.float32)
    mask = np.ones((1, 4), bool)
    pred = np.array([[0, 9, 2, 1]], np.float32)
    valid = np.array([[False, True, True, True]])  # the best document is missing
    status = np.zeros(1, np.int32)
    drop = compute_rewards(pred, valid, status, gold, mask, RewardConfig(missing_policy="drop"))
    last = compute_rewards(pred, valid, status, gold, mask, RewardConfig(missing_policy="rank_last"))
    penal = compute_rewards(pred, valid, status, gold, mask, RewardConfig(missing_policy="format_penalty"))
    np.testing.assert_allclose(drop["recall"], 0.5)  # doc 1 never retrieved
    np.testing.assert_allclose(last["recall"], 1.0)  # ranked 4th, still inside top 10
    assert float(last["ndcg"][0]) > float(drop["ndcg"][0])
    np.testing.assert_allclose(penal["reward"], -0.1)
    np.testing.assert_allclose(drop["valid_fraction"], 0.75)


@pytest.mark.parametrize("policy", ["drop", "rank_last", "format_penalty"])
def test_an_answer_scoring_no_document_earns_the_bad_json_reward(policy):
    """``{}`` (or only unknown keys) parses as JSON but ranks nothing: -0.1, not the ~+0.1 of
    alignment a uniform P would collect against the gold."""
    gold = np.array([[10, 8, 0, 0], [10, 8, 0, 0]], np.float32)
    mask = np.ones((2, 4), bool)
    valid = np.array([[False] * 4, [True, False, False, False]])
    pred = np.array([[0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    got = compute_rewards(pred, valid, np.zeros(2, np.int32), gold, mask, RewardConfig(missing_policy=policy))
    np.testing.assert_allclose(got["reward"][0], -0.1)
    if policy != "format_penalty":  # one scored document (even a 0) is an answer
        assert float(got["reward"][1]) > 0.0


def test_tie_break_policies():
    # Two documents with the same predicted score: "position" ranks the earlier one first,
    # "pessimistic" the one with the lower gold score (ties never pay).
    mask = np.ones((1, 2), bool)
    pred = np.array([[5, 5]], np.float32)
    status = np.zeros(1, np.int32)
    for gold, want_position in (([10, 0], 1.0), ([0, 10], 0.0)):
        gold = np.array([gold], np.float32)
        position = compute_rewards(pred, mask, status, gold, mask, RewardConfig(k=1, tie_break="position"))
        pessimistic = compute_rewards(pred, mask, status, gold, mask, RewardConfig(k=1, tie_break="pessimistic"))
        np.testing.assert_allclose(position["ndcg"], want_position)
        np.testing.assert_allclose(pessimistic["ndcg"], 0.0)


def test_variants_and_padding():
    pred, valid, status, gold, mask = _random_batch(3, batch=16)
    base = compute_rewards(pred, valid, status, gold, mask)
    # Extra padding columns change nothing.
    pad = lambda x, v: np.concatenate([x, np.full((x.shape[0], 5), v, x.dtype)], axis=1)
    padded = compute_rewards(pad(pred, 9), pad(valid, True), status, pad(gold, 9), pad(mask, False))
    np.testing.assert_allclose(padded["reward"], base["reward"], atol=1e-6)
    both = compute_rewards(pred, valid, status, gold, mask, RewardConfig(ranking_terms="ndcg+rbo"))
    np.testing.assert_allclose(both["reward"], base["reward"] + 0.1 * base["rbo"], atol=1e-5)
    kl = compute_rewards(pred, valid, status, gold, mask, RewardConfig(divergence="kl"))
    np.testing.assert_allclose(kl["alignment"], np.exp(-np.asarray(base["kl"])), atol=1e-6)
    cfg = RewardConfig(normalization="softmax")
    soft = compute_rewards(pred, valid, status, gold, mask, cfg)
    # softmax-normalised P and Q (at the configured temperature) against scipy's base-2 JS
    from scipy.spatial.distance import jensenshannon
    from scipy.special import softmax

    for row in range(pred.shape[0]):
        keep = np.asarray(mask[row], bool)
        p = softmax(np.where(valid[row], pred[row], 0.0)[keep] / cfg.softmax_temperature)
        q = softmax(gold[row][keep] / cfg.softmax_temperature)
        np.testing.assert_allclose(soft["js"][row], jensenshannon(p, q, base=2) ** 2, atol=1e-5)
    with pytest.raises(ValueError, match="divergence"):
        RewardConfig(divergence="wasserstein")


def test_sharded_batch():
    devices = np.array(jax.devices())
    assert len(devices) >= 2  # conftest provides 8 fake CPU devices
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    pred, valid, status, gold, mask = _random_batch(4, batch=8 * len(devices))
    sharded = [jax.device_put(x, rows) for x in (pred, valid, status, gold, mask)]
    got = compute_rewards(*sharded)
    want = compute_rewards(pred, valid, status, gold, mask)
    np.testing.assert_allclose(got["reward"], want["reward"], atol=1e-6)
    assert got["reward"].sharding.is_equivalent_to(rows, 1)


def test_config_is_frozen_and_hashable():
    cfg = RewardConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 5  # type: ignore[misc]
    assert hash(cfg) == hash(RewardConfig())
    assert isinstance(
        compute_rewards(
            jnp.zeros((1, 2)),
            jnp.ones((1, 2), bool),
            jnp.zeros(1, jnp.int32),
            jnp.zeros((1, 2)),
            jnp.ones((1, 2), bool),
        )["reward"],
        jax.Array,
    )
