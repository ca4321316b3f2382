"""``grouprank synth`` end to end: first-stage runs -> pools -> pointwise and listwise teachers ->
fusion -> groups -> ``sft.jsonl``, ``rl.jsonl``, ``audit.jsonl`` and ``manifest.json``.

Resuming: the pools are saved (``pools.json``, with the options they came from) and every teacher
answer is in the disk cache, so rerunning the same command after any interruption redoes only
what is missing, and rerunning a finished command makes no teacher call at all. Outputs are
written to a temporary file and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from grouprank_jax.synth.client import Teacher
from grouprank_jax.synth.fusion import TIE_MODES, fuse, pointwise_order
from grouprank_jax.synth.groups import GroupConfig, make_record, sample_groups
from grouprank_jax.synth.pools import PoolConfig, Pools, build_pools, hybrid_ranking
from grouprank_jax.synth.stages import CallConfig, StageCounts, listwise_stage, pointwise_stage, reason_stage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    data: str
    out: str
    runs: tuple[str, ...] = ()
    qrels: str | None = None  # optional: NDCG@10 of the teachers' and the fused lists in the manifest
    pools: PoolConfig = PoolConfig()
    calls: CallConfig = CallConfig()
    groups: GroupConfig = GroupConfig()
    beta: float = 0.5  # [paper-notes §5.4] Eq. 2
    pointwise_ties: str = "min"  # [INFERRED] see synth/fusion.py

    def __post_init__(self):
        if self.pointwise_ties not in TIE_MODES:
            raise ValueError(f"--pointwise-ties {self.pointwise_ties!r}; choose one of {TIE_MODES}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must be in [0, 1], got {self.beta}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def load_first_stage(cfg: SynthConfig) -> tuple[dict[str, str], dict[str, str], list[dict]]:
    """(queries, texts by docid, runs) from ``--data`` and ``--run`` (BM25 when no run is given)."""
    from grouprank_jax.data.formats import read_collection, write_run
    from grouprank_jax.retrieve import bm25_run
    from grouprank_jax.task.rerank import load_candidates

    run_paths: list[str | None] = list(cfg.runs)
    data = Path(cfg.data)
    if not run_paths:
        if data.is_dir():
            corpus, queries = read_collection(data)
            bm25 = Path(cfg.out) / "bm25.run"
            log.info("no --run given: BM25 top-%d over %d documents -> %s", cfg.pools.depth, len(corpus), bm25)
            write_run(bm25_run(corpus, queries, top_k=cfg.pools.depth), bm25, tag="bm25s")
            run_paths = [str(bm25)]
        else:
            run_paths = [None]  # the rank_llm JSON's own hits
    queries: dict[str, str] = {}
    texts: dict[str, str] = {}
    runs = []
    for path in run_paths:
        found, candidates = load_candidates(cfg.data, path)
        queries.update(found)
        runs.append({qid: {c.docid: c.score for c in docs} for qid, docs in candidates.items()})
        for docs in candidates.values():
            for c in docs:
                texts.setdefault(c.docid, c.text)
    return queries, texts, runs


def _file_stamps(path: Path) -> list:
    """[[relative name, size, mtime_ns], ...] of a file, or of every file under a directory."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [[str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _pools(cfg: SynthConfig) -> tuple[dict[str, str], dict[str, str], Pools]:
    """Stage 1, saved to ``pools.json`` and reused while its inputs and options are unchanged."""
    path = Path(cfg.out) / "pools.json"
    fingerprint = {
        "data": str(Path(cfg.data).resolve()),
        "runs": [str(Path(r).resolve()) for r in cfg.runs],
        "options": dataclasses.asdict(cfg.pools),
        # size and mtime of every input file: an edited query, document or run rebuilds the pools
        "stamps": [_file_stamps(Path(x)) for x in (cfg.data, *cfg.runs)],
    }
    saved = {}
    if path.exists():
        try:  # derived from the inputs, so a damaged copy is rebuilt, not an error
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            log.warning("pools: %s is unreadable (line %d: %s); rebuilding it", path, err.lineno, err.msg)
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            log.info("pools: reusing %s", path)
            p = saved["pools"]
            return saved["queries"], saved["texts"], Pools(p["pools"], p["first_stage_rank"], p["short"], p["dropped"])
    queries, texts, runs = load_first_stage(cfg)
    pools = build_pools(hybrid_ranking(runs, cfg.pools.alpha), queries, cfg.pools)
    used = {d for pool in pools.pools.values() for d in pool}
    queries = {q: queries[q] for q in pools.pools}
    texts = {d: t for d, t in texts.items() if d in used}
    record = {"fingerprint": fingerprint, "queries": queries, "texts": texts, "pools": dataclasses.asdict(pools)}
    _write_atomic(path, json.dumps(record, ensure_ascii=False))
    return queries, texts, pools


def _as_run(lists: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    return {qid: {d: float(len(docs) - i) for i, d in enumerate(docs)} for qid, docs in lists.items()}


def quality(qrels_path: str, lists: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, dict]:
    """NDCG@10 of each ranking against the qrels (pytrec_eval, queries with judgments only)."""
    from grouprank_jax.data.formats import read_qrels
    from grouprank_jax.eval import evaluate

    qrels = read_qrels(qrels_path)
    out = {}
    for name, ranking in lists.items():
        try:
            result = evaluate(_as_run(ranking), qrels, ("ndcg_cut_10",))
        except ValueError as err:  # e.g. qrels of another dataset: the paid outputs still stand
            log.warning("synth quality of %s not measured: %s", name, err)
            out[name] = {"error": str(err)}
            continue
        out[name] = {"ndcg_cut_10": round(result.mean["ndcg_cut_10"], 6), "queries": result.num_queries}
    return out


def run_synth(cfg: SynthConfig, teachers: Mapping[str, Teacher], progress: bool = True) -> dict:
    """Run every stage; return the manifest (also written to ``OUT/manifest.json``)."""
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    queries, texts, pools = _pools(cfg)
    if pools.dropped:
        log.warning("pools: %d queries left out (listed in manifest.json 'pools.dropped')", len(pools.dropped))
    if pools.short:
        log.warning("pools: %d queries have fewer than %d candidates", len(pools.short), cfg.pools.size)
    ranks = pools.first_stage_rank
    log.info("pools: %d queries, %d documents", len(pools.pools), sum(len(p) for p in pools.pools.values()))

    scores, pointwise_counts = pointwise_stage(pools.pools, queries, texts, teachers["pointwise"], cfg.calls, progress)
    pointwise_lists = {q: pointwise_order(p, scores[q], ranks[q]) for q, p in pools.pools.items()}
    initial = pointwise_lists if cfg.calls.order == "pointwise" else pools.pools
    listwise, listwise_counts = listwise_stage(initial, queries, texts, teachers["listwise"], cfg.calls, progress)

    fused, fused_rank = {}, {}
    for qid, pool in pools.pools.items():
        fused[qid], _ = fuse(pool, scores[qid], listwise[qid], ranks[qid], cfg.beta, cfg.pointwise_ties)
        fused_rank[qid] = {d: r for r, d in enumerate(fused[qid], 1)}

    groups = []
    no_groups = []
    for qid, ranking in fused.items():
        scored = [d for d in ranking if scores[qid][d] is not None]
        made = sample_groups(qid, scored, "sft", cfg.groups.sft_per_query, cfg.groups)
        made += sample_groups(qid, scored, "rl", cfg.groups.rl_per_query, cfg.groups)
        if not made and cfg.groups.sft_per_query + cfg.groups.rl_per_query > 0:
            no_groups.append({"qid": qid, "scored_documents": len(scored)})
        groups.extend(made)
    if no_groups:
        log.warning("%d queries gave no group (too few documents with a pointwise score)", len(no_groups))

    sft_groups = [g for g in groups if g.purpose == "sft"]
    reasons: list[str | None] = [None] * len(sft_groups)
    reason_counts = None
    if "reason" in teachers:
        jobs = [
            (queries[g.qid], [texts[d] for d in g.docids], [scores[g.qid][d] for d in g.docids]) for g in sft_groups
        ]
        reasons, reason_counts = reason_stage(jobs, teachers["reason"], cfg.calls, progress)
    reason_of = {id(g): r for g, r in zip(sft_groups, reasons)}
    records = {"sft": [], "rl": []}
    for g in groups:
        record = make_record(
            g, queries[g.qid], texts, scores[g.qid], fused_rank[g.qid], cfg.groups, reason_of.get(id(g))
        )
        records[g.purpose].append(record)

    _write_atomic(out / "sft.jsonl", _jsonl(records["sft"]))
    _write_atomic(out / "rl.jsonl", _jsonl(records["rl"]))
    audit = [
        {
            "qid": qid,
            "pool": pool,
            "pointwise": scores[qid],
            "listwise": listwise[qid],
            "fused": fused[qid],
        }
        for qid, pool in pools.pools.items()
    ]
    _write_atomic(out / "audit.jsonl", _jsonl(audit))

    manifest = _manifest(cfg, teachers, pools, scores, listwise, fused, pointwise_lists, groups, records)
    manifest["counts"].update(
        pointwise=pointwise_counts.as_dict(),
        listwise=listwise_counts.as_dict(),
        reason=reason_counts.as_dict() if reason_counts else None,
        queries_without_groups=no_groups,
    )
    manifest["totals"] = _totals(
        teachers, [pointwise_counts, listwise_counts] + ([reason_counts] if reason_counts else [])
    )
    manifest["seconds"] = round(time.time() - start, 3)
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _totals(teachers: Mapping[str, Teacher], stages: Sequence[StageCounts]) -> dict:
    distinct = [t.stats for t in teachers.values()]
    return {
        "calls": sum(s.requests for s in distinct),
        "cached": sum(s.cached for s in distinct),
        "retried": sum(s.retried for s in stages) + sum(s.http_retries for s in distinct),
        "format_retries": sum(s.retried for s in stages),
        "http_retries": sum(s.http_retries for s in distinct),
        "repaired": sum(s.repaired for s in stages),
        "missing": sum(s.missing for s in stages),
        "prompt_tokens": sum(s.prompt_tokens for s in distinct),
        "completion_tokens": sum(s.completion_tokens for s in distinct),
    }


def _manifest(cfg, teachers, pools, scores, listwise, fused, pointwise_lists, groups, records) -> dict:
    sizes = collections.Counter(f"{g.purpose}:{len(g.docids)}" for g in groups)
    manifest = {
        "inputs": {
            "data": str(Path(cfg.data).resolve()),
            "runs": [str(Path(r).resolve()) for r in cfg.runs] or None,
            "qrels": str(Path(cfg.qrels).resolve()) if cfg.qrels else None,
        },
        "options": {
            "pools": dataclasses.asdict(cfg.pools),
            "calls": dataclasses.asdict(cfg.calls),
            "groups": dataclasses.asdict(cfg.groups),
            "beta": cfg.beta,
            "pointwise_ties": cfg.pointwise_ties,
        },
        "teachers": {role: {**t.backend.describe(), "stats": t.stats.as_dict()} for role, t in teachers.items()},
        "counts": {
            "queries": len(pools.pools),
            "pool_documents": sum(len(p) for p in pools.pools.values()),
            "sft_records": len(records["sft"]),
            "rl_records": len(records["rl"]),
            "group_sizes": dict(sorted(sizes.items(), key=lambda kv: (kv[0].split(":")[0], int(kv[0].split(":")[1])))),
        },
        "pools": {"short": pools.short, "dropped": pools.dropped},
        "failures": {
            "pointwise_missing": [[q, d] for q, docs in scores.items() for d, s in docs.items() if s is None],
        },
        "outputs": ["sft.jsonl", "rl.jsonl", "audit.jsonl", "manifest.json"],
    }
    if cfg.qrels:
        manifest["quality"] = quality(
            cfg.qrels,
            {"first_stage": pools.pools, "pointwise": pointwise_lists, "listwise": listwise, "fused": fused},
        )
    return manifest
