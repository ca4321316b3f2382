"""A damaged JSON/YAML file the user points at is a one-line error naming the file (and line
where the parser gives one), not a bare ``JSONDecodeError``; a damaged derived cache is rebuilt."""

import json
import logging

import pytest

from grouprank_jax.errors import is_user_error
from grouprank_jax.task.prompts import load_template
from grouprank_jax.weights.hf_io import _tensor_index
from grouprank_jax.weights.orbax_io import read_model_config


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("t.json", '{"system": "s",\n "user": }', "t.json:2: invalid JSON"),
        ("t.yaml", "system: s\nuser: [unclosed\n", "t.yaml:3: invalid YAML"),
    ],
)
def test_a_broken_prompt_template_names_file_and_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=expected) as err:
        load_template(str(path))
    assert is_user_error(err.value)


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"model:\n  preset: tiny\nsft: 5\n", r"run.yaml: sft: expected a mapping of keys, got 5"),
        (b"model: [tiny]\n", r"run.yaml: model: expected a mapping of keys"),
        (b"model:\n  preset: nosuch\n", r"run.yaml: model.preset: unknown model preset 'nosuch'; known: \["),
        # PyYAML keeps the last of two equal keys: the first section would vanish unseen
        (b"sft:\n  epochs: 0\nsft:\n  epochs: 2\n", r"run.yaml: .*key 'sft' appears twice .*\(lines 1 and 3\)"),
        (b"model:\n  preset: tiny\n# caf\xff\n", r"run.yaml:3: not UTF-8 text"),
    ],
)
def test_a_malformed_run_config_names_the_file_and_the_key(tmp_path, body, expected):
    from grouprank_jax.config.run import load_run_config

    path = tmp_path / "run.yaml"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=expected) as err:
        load_run_config(path)
    assert is_user_error(err.value)


def test_a_broken_checkpoint_config_names_the_file(tmp_path):
    (tmp_path / "model_config.json").write_text('{"num_layers": 2,,}')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'model_config.json'}:1: invalid JSON") as err:
        read_model_config(tmp_path)
    assert is_user_error(err.value)


@pytest.mark.parametrize("text", ['{"weight_map": {', "[1, 2]"])
def test_a_broken_safetensors_index_names_the_file(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index") as err:
        _tensor_index(tmp_path)
    assert is_user_error(err.value)


def test_a_damaged_pools_cache_is_rebuilt(tmp_path, shared_data, caplog):
    from grouprank_jax.data.formats import read_rank_llm, write_rank_llm
    from grouprank_jax.synth.pipeline import SynthConfig, _pools

    data = tmp_path / "dl19_3.json"
    write_rank_llm(read_rank_llm(shared_data / "trec_dl" / "rank_llm.BM25.retrieve_results_dl19.json")[:3], data)
    (tmp_path / "out").mkdir()  # the pipeline makes it before stage 1
    cfg = SynthConfig(data=str(data), out=str(tmp_path / "out"))
    first = _pools(cfg)
    cache = tmp_path / "out" / "pools.json"
    cache.write_text(cache.read_text()[:100])  # cut short
    with caplog.at_level(logging.WARNING, logger="grouprank_jax.synth.pipeline"):
        again = _pools(cfg)
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text
    assert again == first and json.loads(cache.read_text())["queries"] == first[0]


def test_non_utf8_record_line_names_file_and_line(tmp_path):
    from grouprank_jax.data.records import DataError, iter_records

    path = tmp_path / "sft.jsonl"
    good = '{"query": "q", "documents": ["a", "b"], "scores": [3, 0]}\n'
    path.write_bytes(good.encode() + good.replace('"a"', '"caf\\u00e9"').encode().replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text"):
        list(iter_records([path], purpose="sft"))


def test_non_utf8_prompt_line_of_generate_names_file_and_line(tmp_path):
    """``grouprank generate --prompts``: was an 'unexpected' UnicodeDecodeError (exit 1)."""
    from grouprank_jax.commands.generate import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt_ids": [1, 2]}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text") as err:
        read_prompts(path, tokenizer=None)
    assert is_user_error(err.value)


@pytest.mark.parametrize(
    "hits, message",
    [
        ([], "nothing to rerank"),
        ([{"query": "q", "hits": []}], "nothing to rerank"),
        ([{"query": "q", "hits": [{"docid": "d", "content": "t", "score": "high"}]}], "entry 0 hit 0: score 'high'"),
        ([{"query": "q", "hits": [{"docid": "d", "content": None}]}], "entry 0 hit 0: content must be a string"),
        (  # the second entry silently replaced the first
            [{"query": "a", "hits": [{"qid": "q", "docid": "d", "content": "t"}]}] * 2,
            "entries 0 and 1 have the same qid 'q'",
        ),
        # JSON's NaN: it used to turn every final score of the query into NaN
        (
            [{"query": "q", "hits": [{"docid": "d", "content": "t", "score": float("nan")}]}],
            "hit 0: score nan is not finite",
        ),
        (
            [{"query": "q", "hits": [{"docid": "d", "content": "t", "score": 1}, {"docid": "e", "content": "u"}]}],
            "entry 0 hit 1: no score, while other hits of this entry have one",
        ),
    ],
)
def test_rerank_input_problems_are_named_before_any_model_loads(tmp_path, hits, message):
    from grouprank_jax.task.rerank import load_candidates

    path = tmp_path / "hits.json"
    path.write_text(json.dumps(hits))
    with pytest.raises(ValueError, match=message):
        load_candidates(str(path), None)


def test_a_step_for_a_directory_without_steps_is_refused(tmp_path):
    """``export-hf --step`` on an import-hf checkpoint or HF directory was silently ignored."""
    from grouprank_jax.config import model_preset
    from grouprank_jax.models import create_model
    from grouprank_jax.weights.loading import load_model
    from grouprank_jax.weights.orbax_io import save_params

    save_params(create_model(model_preset("tiny"), seed=0), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="step=3 picks a checkpoint of a training run directory"):
        load_model(tmp_path / "ckpt", step=3)
    assert load_model(tmp_path / "ckpt").cfg.num_layers == model_preset("tiny").num_layers


def test_rank_llm_hits_without_scores_keep_their_order(tmp_path):
    """Hits without ``score`` are the first stage's ranking in list order: the top-N cut and the
    fused scores follow that order (they used to follow docid order, all scores being 0)."""
    from grouprank_jax.task.rerank import RerankConfig, load_candidates, rerank

    docids = ["d9", "d7", "d5", "d1", "d0"]
    path = tmp_path / "hits.json"
    path.write_text(
        json.dumps([{"query": "q", "hits": [{"qid": "q", "docid": d, "content": f"text of {d}"} for d in docids]}])
    )
    queries, candidates = load_candidates(str(path), None)
    assert [c.docid for c in candidates["q"]] == docids
    assert [c.score for c in candidates["q"]] == [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5]
    seen = []

    def unparsable(prompts):  # every group fails to parse: the first stage decides
        seen.extend(prompts)
        return ["no answer"] * len(prompts)

    run, _ = rerank(
        queries, candidates, unparsable, lambda q, docs: " | ".join(docs), RerankConfig(top_n=2, group_size=2)
    )
    assert sorted(seen[0].split(" | ")) == ["text of d7", "text of d9"]  # the top 2 by hit order
    assert sorted(run["q"], key=run["q"].get, reverse=True) == docids
