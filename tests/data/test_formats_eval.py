"""File formats, trec_eval-semantics evaluation, BM25 retrieval and the eval/retrieve CLIs."""

from __future__ import annotations

import json

import pytest

from grouprank_jax.cli import main
from grouprank_jax.data import formats
from grouprank_jax.eval import evaluate

from conftest import shared_path

DL19 = ("data", "trec_dl")


@pytest.fixture
def dl19():
    return {
        "run": shared_path(*DL19, "rank_llm.BM25.trec_results_dl19.txt"),
        "qrels": shared_path(*DL19, "anserini-tools.qrels.dl19-passage.txt"),
        "json": shared_path(*DL19, "rank_llm.BM25.retrieve_results_dl19.json"),
    }


def test_dl19_bm25_ndcg_matches_pytrec_eval(capsys, dl19):
    import pytrec_eval

    DL19_RUN, DL19_QRELS = dl19["run"], dl19["qrels"]
    run, qrels = formats.read_run(DL19_RUN), formats.read_qrels(DL19_QRELS)
    result = evaluate(run, qrels, ("ndcg_cut_10", "recall_100"))
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    want = sum(v["ndcg_cut_10"] for v in direct.values()) / len(direct)
    assert result.num_queries == 43
    assert result.mean["ndcg_cut_10"] == pytest.approx(want, abs=1e-12)
    assert result.mean["ndcg_cut_10"] == pytest.approx(0.5058, abs=5e-5)
    assert main(["eval", "--run", str(DL19_RUN), "--qrels", str(DL19_QRELS), "--metrics", "ndcg_cut_10"]) == 0
    assert "ndcg_cut_10\t0.5058" in capsys.readouterr().out


def test_queries_without_judgments_are_skipped():
    run = {"q1": {"a": 2.0, "b": 1.0}, "q2": {"a": 1.0}}
    qrels = {"q1": {"b": 1}}
    result = evaluate(run, qrels, ("ndcg_cut_10", "recall_100"))
    assert result.num_queries == 1 and set(result.per_query) == {"q1"}
    assert result.mean["recall_100"] == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(run, qrels, ("nonsense_5",))


def test_metric_names_and_unjudged_runs_are_explained():
    run, qrels = {"q1": {"a": 2.0, "b": 1.0}}, {"q1": {"b": 1}}
    dotted = evaluate(run, qrels, ("ndcg_cut.10",))  # pytrec_eval's request syntax
    assert dotted.mean == {"ndcg_cut_10": evaluate(run, qrels, ("ndcg_cut_10",)).mean["ndcg_cut_10"]}
    with pytest.raises(ValueError, match=r"\['ndcg_cut'\] need a cutoff.*ndcg_cut_10"):
        evaluate(run, qrels, ("ndcg_cut",))
    with pytest.raises(ValueError, match=r"no query of the run .*'q1'.* has judgments .*'Q1'"):
        evaluate(run, {"Q1": {"b": 1}}, ("ndcg_cut_10",))  # a 0.0 over no query would read as a score


@pytest.mark.parametrize("empty", ["run", "qrels"])
def test_eval_of_an_empty_file_names_it(tmp_path, capsys, empty):
    files = {"run": "q1 Q0 d1 1 0.5 t\n", "qrels": "q1 0 d1 1\n"}
    files[empty] = "\n"
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["eval", "--run", str(tmp_path / "run"), "--qrels", str(tmp_path / "qrels")]) == 2
    assert f"{tmp_path / empty}: no lines to evaluate" in capsys.readouterr().err


def test_byte_order_mark_and_bad_encodings(tmp_path):
    (tmp_path / "run.txt").write_bytes("\ufeffq1 Q0 d1 1 0.5 t\n".encode())
    (tmp_path / "qrels.txt").write_bytes("\ufeffq1 0 d1 1\n".encode())
    assert formats.read_run(tmp_path / "run.txt") == {"q1": {"d1": 0.5}}
    assert formats.read_qrels(tmp_path / "qrels.txt") == {"q1": {"d1": 1}}
    (tmp_path / "latin1.txt").write_bytes(b"q1 Q0 d1 1 0.5 t\nq1 Q0 d\xe9 2 0.4 t\n")
    with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8 text"):
        formats.read_run(tmp_path / "latin1.txt")
    (tmp_path / "run.gz").write_bytes(b"q1 Q0 d1 1 0.5 t\n")
    with pytest.raises(ValueError, match=r"run.gz: not a gzip file"):
        formats.read_run(tmp_path / "run.gz")
    (tmp_path / "hits.json").write_bytes(b'[{"query": "caf\xe9", "hits": []}]')
    with pytest.raises(ValueError, match=r"hits.json: not UTF-8 text"):
        formats.read_rank_llm(tmp_path / "hits.json")


def test_run_and_qrels_round_trip(tmp_path):
    run = {"q1": {"d1": 0.5, "d2": 2.0}, "q2": {"x": -1.0}}
    formats.write_run(run, tmp_path / "run.txt")
    assert formats.read_run(tmp_path / "run.txt") == run
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "d2", "1"]  # sorted by score
    qrels = {"q1": {"d1": 2, "d2": 0}}
    formats.write_qrels(qrels, tmp_path / "qrels.txt")
    assert formats.read_qrels(tmp_path / "qrels.txt") == qrels
    (tmp_path / "beir.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert formats.read_qrels(tmp_path / "beir.tsv") == {"q1": {"d1": 1}}


def _hits(*hits):
    """(reader, file text) of one rank_llm entry holding ``hits`` (each given some content)."""
    return formats.read_rank_llm, json.dumps([{"query": "q", "hits": [{"content": "t", **h} for h in hits]}])


@pytest.mark.parametrize(
    "reader, content, message",
    [
        (formats.read_run, "q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 tag\n", ":2: a TREC run line has 6 fields"),
        (formats.read_run, "q1 Q0 d1 1 high tag\n", ":1: score 'high'"),
        (formats.read_qrels, "q1 0 d1 1\n\nq1 0 d2 x\n", ":3: relevance 'x'"),
        (formats.read_beir_corpus, '{"_id": "1", "text": "a"}\n{"text": "b"}\n', ":2: a BEIR JSONL record"),
        (formats.read_beir_queries, '{"_id": "1", "text": "a"}\nnot json\n', ":2: invalid JSON"),
        (formats.read_tsv_pairs, "1\tfine\nno tab here\n", ":2: expected 'id<TAB>text'"),
        # A repeated id would silently replace the earlier line (trec_eval refuses such runs).
        (
            formats.read_run,
            "q1 Q0 d1 1 0.5 t\nq2 Q0 d1 1 0.4 t\nq1 Q0 d1 2 0.3 t\n",
            ":3: query 'q1': document 'd1' again (first on line 1)",
        ),
        (formats.read_qrels, "q1 0 d1 1\nq1 0 d1 2\n", ":2: query 'q1': document 'd1' again (first on line 1)"),
        (
            formats.read_beir_corpus,
            '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
            ":2: document 'd1' again",
        ),
        (formats.read_beir_queries, '{"_id": 7, "text": "a"}\n{"_id": "7", "text": "b"}\n', ":2: query '7' again"),
        (formats.read_tsv_pairs, "1\ta\n1\tb\n", ":2: id '1' again (first on line 1)"),
        # An id that is no string would be written as 'None' / "{'a': 1}" into run files.
        (
            formats.read_beir_corpus,
            '{"_id": null, "text": "a"}\n',
            ":1: '_id' must be a string or an integer, got None",
        ),
        (formats.read_beir_queries, '{"_id": "q 1", "text": "a"}\n', ":1: '_id' 'q 1' is empty or holds whitespace"),
        # Only a real header is skipped: a first judgment with a bad grade is an error, not dropped.
        (formats.read_qrels, "q1\td1\tabc\nq1\td2\t1\n", ":1: relevance 'abc'"),
        # rank_llm hits: a repeated or malformed docid, hits of two queries in one entry
        (*_hits({"docid": "d1"}, {"docid": "d1"}), ": entry 0 hit 1: docid 'd1' again (first in hit 0)"),
        (*_hits({"docid": "d 1"}), ": entry 0 hit 0: 'docid' 'd 1' is empty or holds whitespace"),
        (*_hits({"docid": None}), ": entry 0 hit 0: 'docid' must be a string or an integer"),
        (
            *_hits({"qid": "q1", "docid": "d1"}, {"qid": "q2", "docid": "d2"}),
            ": entry 0 hit 1: qid 'q2', but the entry's first hit has 'q1'",
        ),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, reader, content, message):
    path = tmp_path / "input.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        reader(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_beir_collection_and_rank_llm_round_trip(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "T", "text": "body"}) + "\n" + json.dumps({"_id": 2, "text": "x"}) + "\n"
    )
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what?"}) + "\n")
    corpus, queries = formats.read_collection(tmp_path)
    assert corpus == {"d1": "T body", "2": "x"} and queries == {"q1": "what?"}
    entries = [formats.RankLLMQuery("7", "q", ({"content": "c", "qid": 7, "docid": "d", "rank": 1, "score": 2.5},))]
    formats.write_rank_llm(entries, tmp_path / "r.json")
    back = formats.read_rank_llm(tmp_path / "r.json")
    assert back == entries and formats.rank_llm_to_run(back) == {"7": {"d": 2.5}}
    (tmp_path / "bad.json").write_text('[{"query": "q", "hits": [{"docid": "d"}]}]')
    with pytest.raises(ValueError, match="needs 'content'"):
        formats.read_rank_llm(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="expected corpus.jsonl"):
        formats.read_collection(tmp_path / "nowhere")


def test_rank_llm_dl19_matches_its_trec_run(dl19):
    DL19_JSON, DL19_RUN = dl19["json"], dl19["run"]
    entries = formats.read_rank_llm(DL19_JSON)
    assert len(entries) == 43 and all(len(e.hits) == 100 for e in entries)
    from_json = formats.rank_llm_to_run(entries)
    from_trec = formats.read_run(DL19_RUN)
    assert from_json.keys() == from_trec.keys()
    assert all(from_json[q].keys() == from_trec[q].keys() for q in from_json)


def test_bm25_retrieve_cli_on_noveleval(tmp_path, capsys):
    NOVELEVAL = shared_path("data", "noveleval")
    out = tmp_path / "bm25.txt"
    assert main(["retrieve", "--data", str(NOVELEVAL), "--out", str(out), "--top-k", "20"]) == 0
    run = formats.read_run(out)
    assert len(run) == 21 and all(0 < len(docs) <= 20 for docs in run.values())
    result = evaluate(run, formats.read_qrels(NOVELEVAL / "qrels.txt"), ("ndcg_cut_10",))
    # Over the whole 420-passage corpus (not each query's own 20), BM25 still finds the topic.
    assert result.mean["ndcg_cut_10"] > 0.3


def test_a_corpus_without_an_indexable_word_is_a_user_error():
    """bm25s itself fails with "max() arg is an empty sequence" on such a corpus."""
    from grouprank_jax.errors import is_user_error
    from grouprank_jax.retrieve import bm25_run

    with pytest.raises(ValueError, match=r"the corpus \(2 documents\) holds no indexable word") as err:
        bm25_run({"d1": "x y", "d2": "the a"}, {"q1": "x"})
    assert is_user_error(err.value)
