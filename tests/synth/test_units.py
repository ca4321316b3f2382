"""grouprank synth's pure parts against hand-worked examples and properties: pools, fusion (Eq. 2),
interval sampling (Alg. 1), the teachers' parsers and rank_llm's permutation repair, the cache."""

import json
import math
import random

import pytest

from grouprank_jax.errors import UserError
from grouprank_jax.synth.cache import Completion, DiskCache
from grouprank_jax.synth.fusion import fuse, pointwise_ranks
from grouprank_jax.synth.groups import (
    GroupConfig,
    fused_gold,
    interval_positions,
    mix_weights,
    parse_sizes,
    sample_groups,
    template_reasoning,
)
from grouprank_jax.synth.pools import PoolConfig, build_pools, hybrid_ranking, sample_pool
from grouprank_jax.synth.prompts import parse_listwise, parse_pointwise, receive_permutation
from grouprank_jax.synth.stages import sliding_windows

# ---- pools -----------------------------------------------------------------------------------


def test_hybrid_is_alpha_weighted_minmax_by_hand():
    # run 1: a=10 b=6 c=2 -> norm 1, .5, 0 ; run 2: b=3 c=1 (a absent) -> norm b=1, c=0, a=0
    runs = [{"q": {"a": 10.0, "b": 6.0, "c": 2.0}}, {"q": {"b": 3.0, "c": 1.0}}]
    got = dict(hybrid_ranking(runs, alpha=0.5)["q"])
    assert got == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.0})
    assert [d for d, _ in hybrid_ranking(runs, alpha=0.5)["q"]] == ["b", "a", "c"]
    # alpha 0.8 trusts run 1: a = .8, b = .8*.5 + .2 = .6
    assert [d for d, _ in hybrid_ranking(runs, alpha=0.8)["q"]] == ["a", "b", "c"]
    # one run: its own order
    assert [d for d, _ in hybrid_ranking(runs[:1])["q"]] == ["a", "b", "c"]


def test_pool_is_top_plus_seeded_sample_in_first_stage_order():
    ranked = [f"d{i}" for i in range(1, 301)]
    cfg = PoolConfig(top=10, random=40, depth=200, seed=3)
    pool = sample_pool(ranked, "q1", cfg)
    assert pool[:10] == ranked[:10] and len(pool) == 50 and len(set(pool)) == 50
    tail_ranks = [ranked.index(d) + 1 for d in pool[10:]]
    assert all(11 <= r <= 200 for r in tail_ranks) and tail_ranks == sorted(tail_ranks)
    assert sample_pool(ranked, "q1", cfg) == pool  # seeded
    assert sample_pool(ranked, "q2", cfg) != pool  # per query
    assert sample_pool(ranked, "q1", PoolConfig(seed=4)) != pool


def test_short_and_empty_queries_are_reported_not_dropped_silently():
    ranking = {"full": [(f"d{i}", -i) for i in range(60)], "short": [(f"s{i}", -i) for i in range(20)]}
    ranking["tiny"] = [("t1", 1.0), ("t2", 0.5)]
    queries = {"full": "a", "short": "b", "tiny": "c", "none": "d"}
    pools = build_pools(ranking, queries, PoolConfig(min_pool=5))
    assert sorted(pools.pools) == ["full", "short"] and len(pools.pools["short"]) == 20
    assert pools.short == [{"qid": "short", "candidates": 20, "pool": 20, "wanted": 50}]
    assert sorted((d["qid"], d["candidates"]) for d in pools.dropped) == [("none", 0), ("tiny", 2)]


# ---- fusion ----------------------------------------------------------------------------------


def test_fusion_by_hand():
    pool = ["a", "b", "c", "d"]
    first = {"a": 1, "b": 2, "c": 3, "d": 4}
    scores = {"a": 3, "b": 9, "c": 5, "d": None}
    listwise = ["c", "a", "b", "d"]  # L_l: c1 a2 b3 d4 ; L_p: b1 c2 a3 d4
    fused, s = fuse(pool, scores, listwise, first, beta=0.5)
    # S = -.5 ln(Lp) - .5 ln(Ll): c -.5 ln2, b -.5 ln3, a -.5 ln6, d -ln4
    assert s["c"] == pytest.approx(-0.5 * math.log(2)) and s["a"] == pytest.approx(-0.5 * math.log(6))
    assert fused == ["c", "b", "a", "d"]
    # beta = 1 is the pointwise order, beta = 0 the listwise one
    assert fuse(pool, scores, listwise, first, beta=1.0)[0] == ["b", "c", "a", "d"]
    assert fuse(pool, scores, listwise, first, beta=0.0)[0] == listwise


def test_fusion_ties_go_to_pointwise_score_then_first_stage_rank():
    pool = ["a", "b", "c", "d"]
    first = {"a": 1, "b": 2, "c": 3, "d": 4}
    # Lp: b1 a2 c3 d4 ; Ll: a1 b2 d3 c4 -> products a2 b2 c12 d12: a/b tie (b scores higher), c/d tie
    scores = {"a": 6, "b": 8, "c": 2, "d": 1}
    assert fuse(pool, scores, ["a", "b", "d", "c"], first)[0] == ["b", "a", "c", "d"]
    # equal pointwise scores too: the first-stage rank decides
    scores = {"a": 5, "b": 5, "c": 2, "d": 2}
    lp = pointwise_ranks(pool, scores, first, "min")
    assert lp == {"a": 1, "b": 1, "c": 3, "d": 3}
    # strict positions: Lp a1 b2 c3 d4, Ll b1 a2 d3 c4 -> products a2 b2 c12 d12, all tied in pairs
    assert pointwise_ranks(pool, scores, first, "position") == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert fuse(pool, scores, ["b", "a", "d", "c"], first, ties="position")[0] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("ties", ["min", "position"])
def test_fusion_at_half_is_rank_product_order(ties):
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 30)
        pool = [f"d{i}" for i in range(n)]
        first = {d: i + 1 for i, d in enumerate(pool)}
        scores = {d: (rng.randint(0, 10) if rng.random() > 0.1 else None) for d in pool}
        listwise = rng.sample(pool, n)
        fused, _ = fuse(pool, scores, listwise, first, beta=0.5, ties=ties)
        lp = pointwise_ranks(pool, scores, first, ties)
        ll = {d: r for r, d in enumerate(listwise, 1)}
        pw = {d: -1 if scores[d] is None else scores[d] for d in pool}
        assert fused == sorted(pool, key=lambda d: (lp[d] * ll[d], -pw[d], first[d]))


# ---- groups ----------------------------------------------------------------------------------


def test_interval_sampling_by_hand_and_properties():
    assert interval_positions(50, 10) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]  # the paper's example
    # stride 2.5 from 1.5: 1.5, 4, 6.5, 9, ... floored
    assert interval_positions(50, 20, offset=1.5) == [int(1.5 + 2.5 * i) for i in range(20)]
    assert interval_positions(50, 20, offset=1.5)[:4] == [1, 4, 6, 9]
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randint(1, 60)
        size = rng.randint(1, n)
        offset = rng.random() * n / size
        pos = interval_positions(n, size, offset)
        assert len(pos) == size and pos == sorted(set(pos)) and 0 <= pos[0] and pos[-1] < n
    with pytest.raises(ValueError):
        interval_positions(5, 6)


def test_groups_sizes_shuffle_and_seeds():
    fused = [f"d{i}" for i in range(50)]
    cfg = GroupConfig(sizes=parse_sizes("5,10,20"), mix="uniform", seed=7)
    groups = sample_groups("q", fused, "sft", 300, cfg)
    sizes = [len(g.docids) for g in groups]
    assert set(sizes) == {5, 10, 20} and all(sizes.count(s) > 60 for s in (5, 10, 20))
    for g in groups:
        ranks = sorted(fused.index(d) for d in g.docids)
        assert ranks == sorted(set(ranks))  # distinct documents
    shuffled = sum([fused.index(d) for d in g.docids] != sorted(fused.index(d) for d in g.docids) for g in groups)
    assert shuffled > 290  # prompt order is shuffled
    assert sample_groups("q", fused, "sft", 300, cfg) == groups  # seeded
    assert sample_groups("q", fused, "sft", 300, GroupConfig(sizes=cfg.sizes, mix="uniform", seed=8)) != groups
    assert sample_groups("q", fused, "rl", 300, cfg) != groups
    only10 = GroupConfig(sizes=parse_sizes("5-20"), mix="10:1", offset="zero")
    (g,) = sample_groups("q", fused, "sft", 1, only10)
    assert sorted(fused.index(d) for d in g.docids) == list(range(0, 50, 5))
    # sizes larger than the list are never drawn
    assert {len(g.docids) for g in sample_groups("q", fused[:7], "sft", 50, cfg)} == {5}


def test_mix_parsing_and_targets():
    assert parse_sizes("5-8,10") == (5, 6, 7, 8, 10)
    w = mix_weights("paper", parse_sizes("5-20"))
    assert w[10] == 9321 and w[20] == 8711 and w[5] == w[19] == 87
    with pytest.raises(ValueError, match="does not allow"):
        mix_weights("30:1", parse_sizes("5-20"))
    with pytest.raises(ValueError, match="finite weights >= 0"):  # was an unexpected error after the calls
        mix_weights("10:inf,20:1", parse_sizes("5-20"))
    with pytest.raises(ValueError, match="every weight is 0"):  # was 0 records and exit 0
        mix_weights("10:0,20:0", parse_sizes("5-20"))
    # gold: the scores sorted descending, handed out in fused order
    assert fused_gold([3, 9, 5], fused_rank=[2, 7, 4]) == [9.0, 3.0, 5.0]
    assert template_reasoning([9, 5, 0]) == (
        "Documents [1] directly help answer the query; [2] are partly useful; [3] do not help answer the query."
    )


# ---- parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("Relevance score: 7", 7),
        ("Relevance score: 7.", 7),
        ("relevance score = 3", 3),
        ("**Relevance score:** 9", 9),
        ("Relevance score: 8/10", 8),
        ("Relevance score: 6.5", 7),  # half up
        ("Relevance score: 6.49", 6),
        ("Relevance score: 0", 0),
        ("Relevance score: 2. On reflection, Relevance score: 4", 4),  # the last one
        ("7", 7),
        (" 10/10 ", 10),
        ("Relevance score: 11", None),
        ("Relevance score: -1", None),
        ("Relevance score: 10/100", None),
        ("Relevance score: 8/10.", 8),  # the sentence's full stop (D.1 asks for "Relevance score: X.")
        ("Relevance score: 10/10. The passage answers it.", 10),
        ("Relevance score: 8/10.5", None),
        ("The document is relevant.", None),
        ("", None),
    ],
)
def test_pointwise_parser(text, want):
    assert parse_pointwise(text) == want


def test_receive_permutation_rank_llm_rule():
    assert receive_permutation([3, 1, 2, 4], 4) == ([3, 1, 2, 4], False)
    # duplicates removed (first kept), out of range dropped, missing appended in input order
    assert receive_permutation([3, 3, 9, 1, 0], 4) == ([3, 1, 2, 4], True)
    assert receive_permutation([2], 3) == ([2, 1, 3], True)


def test_listwise_parser():
    text = "I think [2] is best.\n```json\n[2, 3, 1]\n```"
    assert parse_listwise(text, 3) == ([2, 3, 1], False)
    assert parse_listwise('Ranking: ["[3]", "[1]", "[2]"] done', 3) == ([3, 1, 2], False)
    assert parse_listwise("```json\n[4, 4, 1]\n```", 4) == ([4, 1, 2, 3], True)
    assert parse_listwise("[1] is better than [2]. ```json [2, 1] ```", 2) == ([2, 1], False)
    assert parse_listwise("Final: [2, 1]; note that [1] is long.", 2) == ([2, 1], False)  # not the mention
    for bad in ("no ranking here", "```json\n[]\n```", "[9, 8]", '{"a": 1}'):
        assert parse_listwise(bad, 3) is None, bad


def test_sliding_windows_match_rank_llm():
    assert sliding_windows(50, 20, 10) == [(30, 50), (20, 40), (10, 30), (0, 20)]
    assert sliding_windows(100, 20, 10)[-1] == (0, 20) and len(sliding_windows(100, 20, 10)) == 9
    assert sliding_windows(25, 20, 10) == [(5, 25), (0, 15)]  # the clamped start moves on from 0


# ---- cache -----------------------------------------------------------------------------------


def test_cache_survives_a_torn_last_line_and_locks(tmp_path):
    path = tmp_path / "c.jsonl"
    with DiskCache(path) as cache:
        cache.put("k1", "m", Completion("one", 3, 1))
        cache.put("k2", "m", Completion("two", 4, 2))
        with pytest.raises(Exception, match="another grouprank synth"):
            DiskCache(path)
    with open(path, "ab") as handle:
        handle.write(b'{"key": "k3", "model": "m", "te')  # a write cut short by a crash
    with DiskCache(path) as cache:
        assert cache.get("k1") == Completion("one", 3, 1) and cache.get("k3") is None and len(cache) == 2
        cache.put("k3", "m", Completion("three"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["k1", "k2", "k3"]


@pytest.mark.parametrize(
    "bad_line, reason", [(b"{not json\n", "Expecting property name"), (b'{"text": "no key"}\n', "missing 'key'")]
)
def test_a_damaged_middle_line_is_an_error_naming_it_and_nothing_is_lost(tmp_path, bad_line, reason):
    path = tmp_path / "c.jsonl"
    with DiskCache(path) as cache:
        for i in range(4):
            cache.put(f"k{i}", "m", Completion(f"answer {i}"))
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = b"".join(lines[:1] + [bad_line] + lines[1:])  # line 2 of 5
    path.write_bytes(damaged)
    with pytest.raises(UserError, match=rf"{path}:2: not a cache entry \(.*{reason}") as err:
        DiskCache(path)
    assert "delete that line" in str(err.value)
    assert path.read_bytes() == damaged  # the paid answers after the bad line are all still there
    path.write_bytes(b"".join(lines))  # repaired: every entry loads, and the lock was released
    with DiskCache(path) as cache:
        assert len(cache) == 4 and cache.get("k3") == Completion("answer 3")


def test_pools_are_rebuilt_when_an_input_file_changes(tmp_path):
    """pools.json is reused while the inputs are unchanged; editing --data in place (same path,
    same options) rebuilds it (the fingerprint held only paths and options)."""
    import json
    import os

    from grouprank_jax.synth.pipeline import SynthConfig, _pools
    from grouprank_jax.synth.pools import PoolConfig

    data = tmp_path / "hits.json"

    def write(query: str):
        hits = [{"qid": "q1", "docid": f"d{i}", "content": f"text {i}", "score": 10.0 - i} for i in range(6)]
        data.write_text(json.dumps([{"query": query, "hits": hits}]))

    cfg = SynthConfig(data=str(data), out=str(tmp_path / "out"), pools=PoolConfig(top=3, random=2, depth=6))
    (tmp_path / "out").mkdir()
    write("original query")
    assert _pools(cfg)[0] == {"q1": "original query"}
    assert _pools(cfg)[0] == {"q1": "original query"}  # reused
    write("edited query")
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later mtime, as an editor leaves
    assert _pools(cfg)[0] == {"q1": "edited query"}


def test_an_answer_that_is_not_the_teachers_is_not_cached(tmp_path):
    """The in-process teacher answers "" for a prompt over --teacher-max-prompt-len: that filler
    is used once and not cached, so a rerun with a larger limit asks again (it was served from
    the cache forever). Test double: a backend that answers from a fixed list."""
    from grouprank_jax.synth.cache import Completion, DiskCache
    from grouprank_jax.synth.client import Teacher, TeacherStats

    class ScriptedBackend:  # test double for the JAX / HTTP backends
        model = "scripted"

        def __init__(self, answers):
            self.answers, self.stats, self.asked = answers, TeacherStats(), 0

        def run(self, bodies, on_done):
            for j, _ in enumerate(bodies):
                self.asked += 1
                on_done(j, self.answers[j])

    bodies = [{"messages": [{"role": "user", "content": c}]} for c in ("short", "too long")]
    first = ScriptedBackend([Completion("Relevance score: 7", 3, 4), Completion("", 900, 0, cacheable=False)])
    with DiskCache(tmp_path / "cache.jsonl") as cache:
        assert [c.text for c in Teacher("pointwise", first, cache).complete(bodies)] == ["Relevance score: 7", ""]
    again = ScriptedBackend([Completion("Relevance score: 2", 900, 4)])
    with DiskCache(tmp_path / "cache.jsonl") as cache:
        texts = [c.text for c in Teacher("pointwise", again, cache).complete(bodies)]
    assert texts == ["Relevance score: 7", "Relevance score: 2"] and again.asked == 1
