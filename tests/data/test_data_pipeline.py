"""Records validation (file:line errors), loading, and the grain SFT/RL pipelines."""

import json

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grouprank_jax.data.pipeline import (
    chat_tokenize_fn,
    pad_batch,
    rl_dataset,
    sft_dataset,
)
from grouprank_jax.data.records import DataError, load_records, records_from_rows

# Synchronous reads keep these tiny pipelines fast; the resume tests keep grain's default
# prefetch threads, the production path.
SYNC = grain.ReadOptions(num_threads=0)
GROUP = {"query": "q", "documents": ["a", "b"], "scores": [3, 10]}
CHAT = {"prompt": "p", "output": "o"}


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def _char_tokenize(record):
    """Fake tokenizer: one id per character, so batches decode back to their records."""
    return [ord(c) for c in record["prompt"]], [ord(c) for c in record["output"]]


def _chat_records(n, prompt_len=lambda i: 4, output_len=lambda i: 2):
    rows = [{"prompt": f"{i:03d}" + "x" * (prompt_len(i) - 3), "output": "y" * output_len(i)} for i in range(n)]
    return records_from_rows(rows)


def _record_ids(batch):
    """The 3-digit record number at the start of each packed/unpacked segment."""
    ids = []
    for row, seg, pos in zip(batch["input_ids"], batch["segment_ids"], batch["positions"]):
        for start in np.flatnonzero((pos == 0) & (seg > 0)):
            ids.append(int("".join(chr(c) for c in row[start : start + 3])))
    return ids


# ---- records ----------------------------------------------------------------------------------


def test_invalid_json_line_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "sft.jsonl", [CHAT, CHAT, '{"prompt": "p", "output": '])
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        load_records(path, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "p"}, r"missing required field 'output'"),
        ({"query": "q", "documents": ["a"]}, r"missing required field 'scores'"),
        ({**GROUP, "scores": [3]}, r"'scores' has 1 entries but 'documents' has 2"),
        ({**GROUP, "scores": [3, 11]}, r"scores\[1\] = 11 is outside 0..10"),
        ({**GROUP, "scores": [3, "7"]}, r"scores\[1\] = '7' must be an integer"),
        ({**GROUP, "documents": "a b"}, r"'documents' must be a non-empty list"),
        ({**GROUP, "documents": [{"docid": "1"}, "b"]}, r"documents\[0\] needs string 'docid' and 'text'"),
        ({**GROUP, "gold": [1.0, float("nan")]}, r"gold\[1\] = nan must be a finite number"),
        (
            {**GROUP, "documents": [{"docid": "d1", "text": "a"}, {"docid": "d1", "text": "b"}]},
            r"documents\[1\] has docid 'd1' again \(documents\[0\]\)",
        ),
        ({**GROUP, "prompt": "p"}, r"mixes chat fields"),
        ({"text": "t"}, r"unrecognised record"),
        ([1, 2], r"must be a JSON object"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "data.jsonl", [CHAT, bad, CHAT])
    with pytest.raises(DataError, match=rf"^{path}:2: .*{message}"):
        load_records(path, cache_dir=str(tmp_path / "cache"))


def test_fields_training_does_not_read_are_reported_once_per_file(tmp_path, caplog):
    """A misspelt field ("scroes" beside the real "scores", "glod") is ignored by training: the
    file, each such field and the line it first appears on are named in one warning."""
    import logging

    from grouprank_jax.data.records import iter_records

    synth_written = {**GROUP, "qid": "q7", "fused_rank": [1, 2]}  # provenance: not reported
    path = _write_jsonl(tmp_path / "rl.jsonl", [synth_written, {**GROUP, "glod": [1, 0]}, {**GROUP, "scroes": [1, 1]}])
    with caplog.at_level(logging.WARNING, logger="grouprank_jax.data.records"):
        assert len(list(iter_records([path], purpose="rl"))) == 3
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{path}: records carry fields training does not read")
    assert f"'glod' (first at {path}:2), 'scroes' (first at {path}:3)" in warning


def test_rl_purpose_requires_grouprank_with_labels():
    with pytest.raises(DataError, match=r"<memory>:1: RL needs grouprank"):
        records_from_rows([CHAT], purpose="rl")
    with pytest.raises(DataError, match=r"needs 'gold'"):
        records_from_rows([{"query": "q", "documents": ["a"]}], purpose="rl")
    (rec,) = records_from_rows([{"query": "q", "documents": ["a"], "gold": [2]}], purpose="rl")
    assert rec["gold"] == [2.0] and rec["scores"] is None


def test_jsonl_load_normalises_all_forms(tmp_path):
    a = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"system": "s", "prompt": "p", "output": "o", "unused_extra": 1},
            "",  # blank lines are not records and do not shift line numbers
            {"instruction": "do", "input": "this", "output": "ok"},
            "",
        ],
    )
    b = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"query": "q", "documents": ["d1", {"docid": "X", "text": "d2"}], "scores": [1, 9], "reasoning": "r"},
            {"query": "q2", "documents": ["d"], "scores": [4], "gold": [0.5]},
        ],
    )
    ds = load_records([a, b], cache_dir=str(tmp_path / "cache"))
    rows = list(ds)
    assert [r["kind"] for r in rows] == ["chat", "chat", "grouprank", "grouprank"]
    assert rows[0]["system"] == "s" and rows[1]["prompt"] == "do\nthis"
    assert rows[2]["documents"] == [{"docid": "1", "text": "d1"}, {"docid": "X", "text": "d2"}]
    assert rows[2]["gold"] == [1.0, 9.0]  # gold defaults to scores
    assert rows[3]["gold"] == [0.5] and rows[3]["scores"] == [4]
    assert rows[3]["source"] == f"{b}:2"
    assert rows[1]["source"] == f"{a}:3"  # after the blank line 2
    bad = _write_jsonl(tmp_path / "bad.jsonl", [CHAT, "", {"query": "q", "documents": ["a"], "scores": [11]}])
    with pytest.raises(DataError, match=rf"^{bad}:3: "):
        load_records(bad, cache_dir=str(tmp_path / "cache"))


def test_parquet_path_loads_and_names_rows(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([GROUP, {**GROUP, "query": "q2"}]), good)
    ds = load_records(good, cache_dir=str(tmp_path / "cache"))
    assert [r["query"] for r in ds] == ["q", "q2"]
    assert ds[0]["scores"] == [3, 10]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([GROUP, {**GROUP, "scores": [1, 12]}]), bad)
    with pytest.raises(DataError, match=rf"^{bad}:2: scores\[1\] = 12 is outside"):
        load_records(bad, cache_dir=str(tmp_path / "cache"))


# ---- SFT batches ------------------------------------------------------------------------------


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_seeded_shuffle_is_deterministic_and_reshuffles_each_epoch():
    records = _chat_records(8)
    make = lambda seed: sft_dataset(
        records,
        _char_tokenize,
        seq_len=16,
        batch_size=4,
        seed=seed,
        shard_index=0,
        shard_count=1,
        num_epochs=2,
        read_options=SYNC,
    )
    order = lambda seed: [i for b in make(seed) for i in _record_ids(b)]
    first = order(0)
    assert first == order(0)
    assert first != order(1)
    epoch0, epoch1 = first[:8], first[8:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(8))
    assert epoch0 != epoch1


def test_shards_are_disjoint_equal_and_covering():
    records = records_from_rows([{**GROUP, "query": f"q{i}"} for i in range(10)], purpose="rl")
    shards = [
        [
            r["query"]
            for batch in rl_dataset(records, 1, seed=3, shard_index=i, shard_count=3, num_epochs=1, read_options=SYNC)
            for r in batch
        ]
        for i in range(3)
    ]
    assert [len(s) for s in shards] == [3, 3, 3]  # 10 trimmed to 9 so all processes step alike
    flat = [q for s in shards for q in s]
    assert len(set(flat)) == 9 and set(flat) <= {f"q{i}" for i in range(10)}


def test_rl_global_batch_is_independent_of_process_count():
    """Concatenating the processes' slices in process order gives the 1-process batch."""
    records = records_from_rows([{**GROUP, "query": f"q{i}"} for i in range(24)], purpose="rl")

    def batches(count, per_process):
        iters = [
            iter(
                rl_dataset(
                    records, per_process, seed=5, shard_index=i, shard_count=count, num_epochs=1, read_options=SYNC
                )
            )
            for i in range(count)
        ]
        return [[r["query"] for it in iters for r in next(it)] for _ in range(24 // (per_process * count))]

    single = batches(1, 4)
    assert batches(2, 2) == single
    assert batches(4, 1) == single
    assert sorted(q for b in single for q in b) == sorted(f"q{i}" for i in range(24))


def test_bucket_padding_shapes_and_loss_alignment():
    records = _chat_records(6, prompt_len=lambda i: 4 + 5 * i, output_len=lambda i: 3)
    ds = sft_dataset(
        records,
        _char_tokenize,
        seq_len=40,
        batch_size=2,
        seed=0,
        shard_index=0,
        shard_count=1,
        length_buckets=(8, 16),
        num_epochs=1,
        read_options=SYNC,
    )
    batches = list(ds)
    assert len(batches) == 3
    for batch in batches:
        lengths = batch["attention_mask"].sum(1)
        expected_t = next(b for b in (8, 16, 40) if b >= lengths.max())
        assert all(v.shape == (2, expected_t) and v.dtype == np.int32 for v in batch.values())
        for row in range(2):
            n = lengths[row]
            ids = batch["input_ids"][row]
            np.testing.assert_array_equal(batch["targets"][row, : n - 1], ids[1:n])
            # The mask marks positions whose *next* token is one of the 3 target tokens.
            np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][row]), np.arange(n - 4, n - 1))
            assert (ids[n:] == 151643).all() and (batch["positions"][row, :n] == np.arange(n)).all()


def test_packing_segments_positions_and_mask():
    # Lengths 6, 6, 6, 9, 6, ...: rows of 16 hold two 6s (the third 6 overflows to row 2).
    records = _chat_records(6, prompt_len=lambda i: 7 if i == 3 else 4, output_len=lambda i: 2)
    ds = sft_dataset(
        records,
        _char_tokenize,
        seq_len=16,
        batch_size=2,
        seed=0,
        shard_index=0,
        shard_count=1,
        packing=True,
        num_epochs=1,
        drop_remainder=False,
        read_options=SYNC,
    )
    batches = list(ds)
    lengths_in_order = [len(r["prompt"]) + 2 for r in (records[i] for b in batches for i in _record_ids(b))]
    assert sorted(lengths_in_order) == [6, 6, 6, 6, 6, 9]
    for batch in batches:
        assert batch["input_ids"].shape == (2, 16)
        for row in range(2):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                n = where.size
                assert (np.diff(where) == 1).all()  # contiguous segment
                np.testing.assert_array_equal(pos[where], np.arange(n))
                ids = batch["input_ids"][row, where]
                np.testing.assert_array_equal(batch["targets"][row, where[:-1]], ids[1:])
                # Last token of a segment predicts nothing (no cross-segment leakage).
                assert batch["targets"][row, where[-1]] == 151643
                np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][row, where]), [n - 3, n - 2])
            pad = seg == 0
            assert (pos[pad] == 0).all() and (batch["loss_mask"][row][pad] == 0).all()
            assert (batch["attention_mask"][row] == (seg > 0)).all()


def test_truncation_policies():
    (rec,) = records_from_rows([{"prompt": "abcdefgh", "output": "XYZ"}], name="f.jsonl")
    common = dict(seq_len=6, batch_size=1, seed=0, shard_index=0, shard_count=1, read_options=SYNC)
    with pytest.raises(DataError, match=r"f.jsonl:1: 8 prompt \+ 3 target tokens = 11 > seq_len=6"):
        next(iter(sft_dataset([rec], _char_tokenize, **common)))
    left = next(iter(sft_dataset([rec], _char_tokenize, truncation="left", **common)))
    assert "".join(map(chr, left["input_ids"][0])) == "fghXYZ"
    assert left["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0]  # h->X, X->Y, Y->Z
    with pytest.raises(DataError, match=r"the prompt alone fills seq_len"):
        next(iter(sft_dataset([rec], _char_tokenize, truncation="right", **common)))
    (short,) = records_from_rows([{"prompt": "abcd", "output": "XYZW"}])
    right = next(iter(sft_dataset([short], _char_tokenize, truncation="right", **common)))
    assert "".join(map(chr, right["input_ids"][0])) == "abcdXY"
    assert right["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_iterator_resumes_exactly(packing):
    records = _chat_records(13, prompt_len=lambda i: 4 + i % 5, output_len=lambda i: 1 + i % 3)
    ds = sft_dataset(
        records,
        _char_tokenize,
        seq_len=24,
        batch_size=2,
        seed=7,
        shard_index=1,
        shard_count=2,
        packing=packing,
        length_buckets=(12,),
    )
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = [next(it) for _ in range(6)]
    it2 = iter(ds)
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_rl_iterator_yields_record_lists_and_resumes():
    records = records_from_rows([{**GROUP, "query": f"q{i}"} for i in range(7)], purpose="rl")
    ds = rl_dataset(records, batch_size=3, seed=1, shard_index=0, shard_count=1)
    it = iter(ds)
    first = next(it)
    assert isinstance(first, list) and len(first) == 3 and first[0]["kind"] == "grouprank"
    state = it.get_state()
    expected = [[r["query"] for r in next(it)] for _ in range(4)]
    it2 = iter(ds)
    it2.set_state(state)
    assert [[r["query"] for r in next(it2)] for _ in range(4)] == expected


def test_pad_batch_extends_with_padding():
    records = _chat_records(2)
    batch = next(
        iter(
            sft_dataset(
                records,
                _char_tokenize,
                seq_len=32,
                batch_size=2,
                seed=0,
                shard_index=0,
                shard_count=1,
                length_buckets=(8,),
                read_options=SYNC,
            )
        )
    )
    padded = pad_batch(batch, 32)
    assert padded["input_ids"].shape == (2, 32)
    assert (padded["input_ids"][:, 8:] == 151643).all() and (padded["segment_ids"][:, 8:] == 0).all()


class _FakeChatTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        body = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return body + "<assistant>"

    def encode(self, text, add_special_tokens):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def test_chat_tokenize_fn_renders_prompt_and_target():
    (chat,) = records_from_rows([{"system": "S", "prompt": "P", "output": "O"}])
    prompt, target = chat_tokenize_fn(_FakeChatTokenizer())(chat)
    assert "".join(map(chr, prompt)) == "<system>S<user>P<assistant>"
    assert "".join(map(chr, target)) == "O<|im_end|>"
    (group,) = records_from_rows([GROUP])
    with pytest.raises(DataError, match="pass render="):
        chat_tokenize_fn(_FakeChatTokenizer())(group)
    render = lambda r: {"prompt": r["query"], "output": str(r["scores"])}
    prompt, _ = chat_tokenize_fn(_FakeChatTokenizer(), render=render)(group)
    assert "".join(map(chr, prompt)) == "<user>q<assistant>"


def test_loaded_arrow_dataset_feeds_both_pipelines(tmp_path):
    path = _write_jsonl(tmp_path / "mix.jsonl", [{"prompt": f"{i:03d}x", "output": "yy"} for i in range(4)])
    ds = load_records(path, cache_dir=str(tmp_path / "cache"))
    # Shard defaults come from jax.process_index()/process_count() (0 of 1 here).
    batch = next(iter(sft_dataset(ds, _char_tokenize, seq_len=8, batch_size=2, seed=0, read_options=SYNC)))
    assert batch["input_ids"].shape == (2, 8) and len(_record_ids(batch)) == 2
    rl_path = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist([{**GROUP, "query": f"q{i}"} for i in range(4)]), rl_path)
    rl = load_records(rl_path, purpose="rl", cache_dir=str(tmp_path / "cache"))
    (records,) = [next(iter(rl_dataset(rl, 4, seed=0, shard_index=0, shard_count=1, read_options=SYNC)))]
    assert sorted(r["query"] for r in records) == ["q0", "q1", "q2", "q3"]
    with pytest.raises(DataError, match=r"mix.jsonl:\d: RL needs grouprank"):
        next(iter(rl_dataset(ds, 2, seed=0, shard_index=0, shard_count=1, read_options=SYNC)))


def test_edited_file_is_reloaded_not_served_from_cache(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [CHAT])
    cache = str(tmp_path / "cache")
    assert load_records(path, cache_dir=cache)[0]["output"] == "o"
    _write_jsonl(path, [{"prompt": "p", "output": "changed"}])
    assert load_records(path, cache_dir=cache)[0]["output"] == "changed"
