"""``grouprank rerank`` end to end on DL19 with a tiny random-weight model: the pipeline runs and
writes a valid TREC run that covers every query (quality is meaningless with random weights)."""

from grouprank_jax.cli import main
from grouprank_jax.data.formats import read_rank_llm, read_run


def test_rerank_dl19_with_tiny_random_model(tmp_path, shared_data, capsys):
    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model
    from grouprank_jax.weights import save_hf

    model_dir = tmp_path / "tiny"
    save_hf(create_model(model_preset("tiny"), seed=0), model_dir)
    data = shared_data / "trec_dl" / "rank_llm.BM25.retrieve_results_dl19.json"
    out = tmp_path / "reranked.trec"
    code = main(
        [
            "rerank",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--top-n",
            "10",
            "--group-size",
            "10",
            "--batch-size",
            "64",
            "--max-new-tokens",
            "8",
            "--max-prompt-len",
            "1024",
            "--max-doc-chars",
            "200",
            "--qrels",
            str(shared_data / "trec_dl" / "anserini-tools.qrels.dl19-passage.txt"),
        ]
    )
    assert code == 0
    run = read_run(out)
    queries = {str(e.qid) for e in read_rank_llm(data)}
    assert set(run) == queries and len(queries) == 43
    assert all(len(docs) == 100 for docs in run.values())  # reranked top-10 + the rest in retriever order
    printed = capsys.readouterr().out
    assert "parse failures" in printed
