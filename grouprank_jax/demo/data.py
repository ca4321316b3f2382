"""The demo's groupwise dataset, generated deterministically (nothing is downloaded).

A toy retrieval world a tiny model can learn on two CPU cores in a few hundred steps: each
document is four single-token words led by a topic word; a query names one topic; a document
is relevant (gold ``relevant_score``, 8) when its topic is the query's, else 0. The SFT target
judges every document in its reasoning, then scores them as JSON:

    <reason> river no apple yes tiger no honey no </reason>
    <answer> ```json {"[1]": 0, "[2]": 6, ...} ``` </answer>

Like the paper's pipeline (SFT scores from a pointwise teacher, RL rewarded against the fused
gold), the SFT scores are a noisy teacher's: right judgement, but the gold score only with
probability ``teacher_exact`` (0.3), else uniform over 1-9 (relevant) or 0-8 (not). The SFT
model copies that noise, so at temperature 1.0 its rollouts often rank an off-topic document
above an on-topic one: mean reward ~1.10 of a possible 1.30 (simulated with the teacher's score
distribution: 1.14). GRPO against the clean gold has that calibration to learn; with exact
teacher scores the SFT model started GRPO at the ceiling and 16 steps showed no trend.

Why this shape (measured with a small-vocabulary probe of the same model, see the README):
- Without the per-document judgement in the reasoning (e.g. a fixed sentence), relevance is
  not learned: the score tokens stayed at chance (AUC 0.5) for 8,000 steps at init std 0.02
  and reached AUC 0.70 in 800 steps at init std 0.1 (the demo's). The score of
  document k would need two hops at once - find document k, and compare its topic with the
  query - and neither hop pays off alone. Written out, each step is one hop: copy document k's
  topic word (a fixed-offset lookup), judge it next to the copy ("is the token I just wrote
  the query?"), and copy the judgement into the JSON (another fixed offset). With it the
  yes/no tokens reach 97 % accuracy (AUC 0.99) after 700 steps of batch 8 (rising from ~400).
- Off-topic documents have distinct topics, so "this topic word already occurred in the query"
  is exactly "relevant". A document block ("[k]. w1 w2 w3 w4" + blank line) and a JSON entry
  are both eight tokens, so offsets stay fixed for every k; single-digit scores keep every
  JSON entry the same length.

The held-out evaluation uses new queries and documents; its first stage is an uninformative
ranking (random order), so every NDCG gain comes from the reranker.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

TOPICS = (
    "apple",
    "river",
    "tiger",
    "music",
    "coffee",
    "planet",
    "garden",
    "winter",
    "castle",
    "rocket",
    "forest",
    "honey",
    "island",
    "silver",
    "pepper",
    "violin",
    "lemon",
    "mountain",
    "guitar",
    "ocean",
    "butter",
    "desert",
    "camera",
    "pencil",
    "jacket",
    "candle",
    "bridge",
    "window",
    "summer",
    "engine",
    "bottle",
    "flower",
)
FILLERS = (
    "old",
    "new",
    "red",
    "blue",
    "small",
    "big",
    "quiet",
    "bright",
    "dark",
    "warm",
    "cold",
    "fast",
    "slow",
    "soft",
    "green",
    "tall",
    "happy",
    "strange",
    "simple",
    "open",
)


@dataclass(frozen=True)
class DemoDataConfig:
    seed: int = 0
    sft_records: int = 4000  # > steps x batch: every SFT example is new (no memorising)
    rl_records: int = 256
    eval_queries: int = 16
    eval_candidates: int = 20  # documents per held-out query (5 groups of 4)
    min_group: int = 4
    max_group: int = 4
    relevant_score: int = 8
    # The SFT targets come from a noisy pointwise "teacher" (as in the paper, whose SFT scores are
    # a pointwise teacher's and whose RL gold is the fused ranking): its judgement is right, but
    # its score equals the gold only with probability ``teacher_exact``, else it is uniform in
    # the range below. GRPO, rewarded against the clean gold, has this miscalibration to remove.
    teacher_exact: float = 0.3
    teacher_relevant_range: tuple[int, int] = (1, 9)
    teacher_irrelevant_range: tuple[int, int] = (0, 8)


def _document(rng: random.Random, topic: str) -> str:
    return " ".join([topic] + [rng.choice(FILLERS) for _ in range(3)])


def _group(rng: random.Random, size: int, relevant_score: int) -> tuple[str, list[str], list[int]]:
    query = rng.choice(TOPICS)
    relevant = rng.randint(1, max(1, size // 2))
    others = [t for t in TOPICS if t != query]
    topics = [query] * relevant + rng.sample(others, size - relevant)  # distinct off-topic documents
    rng.shuffle(topics)
    docs = [_document(rng, t) for t in topics]
    gold = [relevant_score if t == query else 0 for t in topics]
    return query, docs, gold


def reasoning(query: str, docs: list[str], gold: list[int]) -> str:
    """Each document's topic word and its judgement, in document order: "river no apple yes ..."."""
    return " ".join(f"{doc.split()[0]} {'yes' if g > 0 else 'no'}" for doc, g in zip(docs, gold))


def teacher_scores(rng: random.Random, gold: list[int], cfg: DemoDataConfig) -> list[int]:
    """The noisy teacher's SFT scores: the gold with probability ``teacher_exact``, else uniform
    in the relevant or irrelevant range."""
    scores = []
    for g in gold:
        lo, hi = cfg.teacher_relevant_range if g > 0 else cfg.teacher_irrelevant_range
        scores.append(g if rng.random() < cfg.teacher_exact else rng.randint(lo, hi))
    return scores


def make_records(n: int, rng: random.Random, cfg: DemoDataConfig, sft: bool) -> list[dict]:
    """SFT records carry the teacher's scores and the reasoning; RL records the clean gold."""
    records = []
    for _ in range(n):
        query, docs, gold = _group(rng, rng.randint(cfg.min_group, cfg.max_group), cfg.relevant_score)
        if sft:
            records.append(
                {
                    "query": query,
                    "documents": docs,
                    "scores": teacher_scores(rng, gold, cfg),
                    "reasoning": reasoning(query, docs, gold),
                }
            )
        else:
            records.append({"query": query, "documents": docs, "gold": gold})
    return records


def write_demo_data(out_dir: str | Path, cfg: DemoDataConfig = DemoDataConfig()) -> dict[str, Path]:
    """Write ``sft_train.jsonl``, ``rl_train.jsonl`` and ``eval/`` (BEIR-style corpus, queries,
    qrels and a first-stage TREC run) under ``out_dir``; return their paths."""
    out = Path(out_dir)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    paths = {"sft_train": out / "sft_train.jsonl", "rl_train": out / "rl_train.jsonl"}
    for name, n, sft in (("sft_train", cfg.sft_records, True), ("rl_train", cfg.rl_records, False)):
        with open(paths[name], "w") as fh:
            for record in make_records(n, rng, cfg, sft):
                fh.write(json.dumps(record) + "\n")

    eval_rng = random.Random(cfg.seed + 1)
    corpus, queries, qrels, run = [], [], [], []
    for q in range(cfg.eval_queries):
        qid = f"q{q}"
        query = TOPICS[q % len(TOPICS)]
        queries.append({"_id": qid, "text": query})
        relevant = eval_rng.randint(2, 6)
        others = [t for t in TOPICS if t != query]
        topics = [query] * relevant + eval_rng.sample(others, min(len(others), cfg.eval_candidates - relevant))
        topics += [eval_rng.choice(others) for _ in range(cfg.eval_candidates - len(topics))]
        eval_rng.shuffle(topics)  # the first stage knows nothing: random order
        for rank, topic in enumerate(topics, 1):
            docid = f"{qid}d{rank}"
            corpus.append({"_id": docid, "title": "", "text": _document(eval_rng, topic)})
            qrels.append((qid, docid, 1 if topic == query else 0))
            run.append(f"{qid} Q0 {docid} {rank} {1.0 / rank:.6f} random\n")
    paths.update(
        {
            k: out / "eval" / n
            for k, n in (
                ("corpus", "corpus.jsonl"),
                ("queries", "queries.jsonl"),
                ("qrels", "qrels.tsv"),
                ("run", "run.trec"),
            )
        }
    )
    paths["corpus"].write_text("".join(json.dumps(c) + "\n" for c in corpus))
    paths["queries"].write_text("".join(json.dumps(c) + "\n" for c in queries))
    paths["qrels"].write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in qrels))
    paths["run"].write_text("".join(run))
    paths["eval"] = out / "eval"
    return paths
