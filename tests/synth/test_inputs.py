"""Other inputs and the optional reasoning teacher: a BEIR directory without a run (BM25 from
``grouprank retrieve``'s code is the first stage), two runs fused as a hybrid, and
``--reason-url`` writing the teacher's reasoning into the SFT records."""

import json
import random

from grouprank_jax.cli import main
from grouprank_jax.data.formats import read_run, write_run
from grouprank_jax.synth.pools import PoolConfig, hybrid_ranking, sample_pool

from synth_helpers import dl19, read_manifest, subset, teacher_args  # noqa: F401 (dl19: a fixture)
from teacher_server import TeacherServer


def _beir(data, directory, n):
    directory.mkdir()
    entries = data["entries"][:n]
    docs = {str(h["docid"]): h["content"] for e in entries for h in e.hits}
    (directory / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in docs.items()))
    (directory / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": e.qid, "text": e.query}) + "\n" for e in entries)
    )
    return entries


def test_directory_without_run_uses_bm25_and_two_runs_make_a_hybrid(tmp_path, dl19):  # noqa: F811
    entries = _beir(dl19, tmp_path / "beir", 2)
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"]) as server:
        out = tmp_path / "bm25"
        args = ["synth", "--data", str(tmp_path / "beir"), *teacher_args(server.url), "--pool-random", "10"]
        assert main([*args, "--out", str(out)]) == 0
        bm25 = read_run(out / "bm25.run")
        assert sorted(bm25) == sorted(e.qid for e in entries) and all(len(d) > 20 for d in bm25.values())
        audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
        for row in audit:  # the pool is BM25's top 10 + 10 sampled from ranks 11-200
            ranked = [d for d, _ in sorted(bm25[row["qid"]].items(), key=lambda kv: -kv[1])]
            assert row["pool"] == sample_pool(ranked, row["qid"], PoolConfig(random=10))

        # a second run (random scores): the pools come from the hybrid of both
        rng = random.Random(0)
        reverse = {q: {d: rng.random() for d in docs} for q, docs in bm25.items()}
        write_run(reverse, tmp_path / "reverse.run")
        out2 = tmp_path / "hybrid"
        runs = ["--run", str(out / "bm25.run"), "--run", str(tmp_path / "reverse.run"), "--alpha", "0.7"]
        assert main([*args, *runs, "--out", str(out2)]) == 0
    hybrid = hybrid_ranking([read_run(out / "bm25.run"), read_run(tmp_path / "reverse.run")], alpha=0.7)
    for line in (out2 / "audit.jsonl").read_text().splitlines():
        row = json.loads(line)
        ranked = [d for d, _ in hybrid[row["qid"]]]
        assert row["pool"] == sample_pool(ranked, row["qid"], PoolConfig(random=10))
        assert ranked != [d for d, _ in sorted(bm25[row["qid"]].items(), key=lambda kv: -kv[1])][: len(ranked)]


def test_reasoning_teacher_writes_the_sft_reasoning(tmp_path, dl19):  # noqa: F811
    data = subset(dl19, tmp_path / "dl19_2q.json", 2)
    out = tmp_path / "reason"
    with TeacherServer(dl19["queries"], dl19["texts"], dl19["qrels"]) as server:
        args = ["synth", "--data", str(data), "--out", str(out), *teacher_args(server.url), "--pool-random", "10"]
        assert main([*args, "--reason-url", server.url, "--reason-model", "test-reason"]) == 0
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 4 and {r["reasoning"] for r in sft} == {
        "Each score follows from how directly the document answers the query."
    }
    manifest = read_manifest(out)
    assert manifest["counts"]["reason"]["items"] == 4 and manifest["teachers"]["reason"]["stats"]["requests"] == 4
