"""``grouprank synth`` with the in-process JAX teacher (``--X-model PATH``, no URL) on a tiny
random-weight model: its answers are mostly unparsable, and the pipeline still finishes, counts
every failure, and caches the answers (a rerun generates nothing)."""

import json

from grouprank_jax.cli import main
from grouprank_jax.config import model_preset

from synth_helpers import dl19, read_manifest, subset  # noqa: F401 (dl19: a fixture)


def test_in_process_teacher_finishes_and_counts_format_failures(tmp_path, dl19):  # noqa: F811 (the fixture)
    from grouprank_jax.models import create_model
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import save_hf

    model_dir = tmp_path / "tiny"
    save_hf(create_model(model_preset("tiny"), seed=3), model_dir, tokenizer=load_tokenizer())
    data = subset(dl19, tmp_path / "dl19_2q.json", 2)
    out = tmp_path / "synth"
    args = ["synth", "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--pointwise-model", str(model_dir), "--listwise-model", str(model_dir)]
    args += ["--pool-top", "4", "--pool-random", "2", "--min-pool", "1", "--max-doc-chars", "60", "--max-retries", "1"]
    args += ["--retry-temperature", "0"]  # greedy re-asks: one compiled sampler program per prompt length
    args += ["--pointwise-max-tokens", "6", "--listwise-max-tokens", "6", "--teacher-max-prompt-len", "512"]
    assert main(args) == 0
    manifest = read_manifest(out)
    pointwise, listwise, totals = manifest["counts"]["pointwise"], manifest["counts"]["listwise"], manifest["totals"]
    assert manifest["teachers"]["pointwise"]["backend"] == "jax"
    assert pointwise["items"] == 12 and listwise["items"] == 2
    assert pointwise["format_failures"] > 0 and listwise["format_failures"] > 0  # random weights
    # every unparsable first answer is asked once more; what fails twice is missing
    first_failures = pointwise["format_failures"] - pointwise["missing"]
    assert pointwise["retried"] == first_failures
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert sum(v is None for row in audit for v in row["pointwise"].values()) == pointwise["missing"]
    assert [len(row["fused"]) for row in audit] == [6, 6]
    requests = 12 + pointwise["retried"] + 2 + listwise["retried"]  # bodies asked for
    answers = (out / "cache" / "teachers.jsonl").read_text().splitlines()
    # identical bodies (documents equal in their first 60 characters) are generated once
    assert totals["calls"] == len(answers) <= requests and totals["cached"] == requests - len(answers)
    assert manifest["teachers"]["pointwise"]["stats"]["completion_tokens"] > 0

    assert main(args) == 0  # the answers are cached: nothing is generated again
    again = read_manifest(out)["totals"]
    assert again["calls"] == 0 and again["cached"] == requests


def test_an_in_process_answer_depends_only_on_its_request(tmp_path):
    """A sampled request's answer is the same alone or batched with others (of other seeds), so a
    resumed run, which asks only what the cache lacks, answers what an uninterrupted run would."""
    from grouprank_jax.models import create_model
    from grouprank_jax.synth.client import TeacherStats
    from grouprank_jax.synth.jax_teacher import JaxBackend
    from grouprank_jax.tokenizer import load_tokenizer

    loaded = (create_model(model_preset("tiny"), seed=3), load_tokenizer())
    backend = JaxBackend(str(tmp_path), TeacherStats(), max_prompt_len=64, max_new_tokens=8, loaded=loaded)

    def body(text, seed):
        return {"messages": [{"role": "user", "content": text}], "temperature": 1.0, "max_tokens": 8, "seed": seed}

    def answers(bodies):
        out = {}
        backend.run(bodies, lambda i, completion: out.__setitem__(i, completion.text))
        return [out[i] for i in range(len(bodies))]

    batch = [body("first question", 0), body("second question", 1), body("third question", 0)]
    together = answers(batch)
    assert [answers([b])[0] for b in batch] == together
    assert answers([body("second question", 2)])[0] != together[1]  # the seed still matters
