"""Readers and writers for the IR file formats the CLI consumes and produces.

In memory: a run is ``{qid: {docid: score}}``, qrels are ``{qid: {docid: int grade}}`` (the
shapes pytrec_eval takes), a corpus is ``{docid: text}`` and queries are ``{qid: text}``. Every
id is a string. Malformed input raises ``ValueError`` naming the file and the 1-based line.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
# A first TSV qrels line whose third field is one of these is a header (BEIR: "query-id
# corpus-id score"); any other non-integer relevance is an error, not a skipped judgment.
QRELS_HEADER_NAMES = ("score", "relevance", "rel", "label", "grade")


@dataclasses.dataclass(frozen=True)
class RankLLMQuery:
    """One entry of a rank_llm retrieve_results JSON: a query and its candidate hits."""

    qid: str
    query: str
    hits: tuple[dict, ...]  # each {content, qid, docid, rank, score}


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: a byte-order mark (Windows editors) would otherwise become part of the first id.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline) for non-blank lines."""
    path = Path(path)
    try:
        # Bytes, decoded line by line, so that a non-UTF-8 byte is reported on its own line.
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
                line = line.rstrip("\n").rstrip("\r")
                if line.strip():
                    yield number, line
    except gzip.BadGzipFile as err:
        raise ValueError(f"{path}: not a gzip file ({err}); drop the .gz suffix if it is plain text") from None


def _error(path, number: int, message: str) -> ValueError:
    return ValueError(f"{path}:{number}: {message}")


def _put(table: dict, key, value, lines: dict, line_key, path, number: int, what: str) -> None:
    """``table[key] = value``, refusing a key already read (naming both lines)."""
    if key in table:
        raise _error(path, number, f"{what} {key!r} again (first on line {lines[line_key]})")
    table[key] = value
    lines[line_key] = number


def _id(value, where: str, what: str) -> str:
    """An id as a string: a non-empty string or an integer, without whitespace (ids are
    whitespace-separated fields of run and qrels files); ``where`` starts the error message."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: {what} must be a string or an integer, got {value!r}")
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{where}: {what} {text!r} is empty or holds whitespace (ids are fields of run files)")
    return text


def read_run(path: str | Path) -> Run:
    """TREC run: ``qid Q0 docid rank score tag`` (whitespace separated); a document listed twice
    for one query is an error (its later line would silently replace the earlier one)."""
    run: Run = {}
    lines: dict = {}
    for number, line in text_lines(path):
        fields = line.split()
        if len(fields) != 6:
            raise _error(path, number, f"a TREC run line has 6 fields (qid Q0 docid rank score tag), got {len(fields)}")
        qid, _, docid, _, score, _ = fields
        try:
            value = float(score)
        except ValueError:
            raise _error(path, number, f"score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise _error(path, number, f"score {score!r} is not finite")
        _put(run.setdefault(qid, {}), docid, value, lines, (qid, docid), path, number, f"query {qid!r}: document")
    return run


def write_run(run: Run, path: str | Path, tag: str = "grouprank") -> None:
    """TREC run, each query sorted by score descending (ranks from 1)."""
    with open(path, "w", encoding="utf-8") as handle:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (docid, score) in enumerate(ranked, 1):
                handle.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")


def read_qrels(path: str | Path) -> Qrels:
    """qrels ``qid 0 docid rel`` (TREC) or ``qid\\tdocid\\trel`` (BEIR TSV, header allowed)."""
    qrels: Qrels = {}
    lines: dict = {}
    for number, line in text_lines(path):
        fields = line.split()
        if len(fields) == 4:
            qid, _, docid, grade = fields
        elif len(fields) == 3:
            qid, docid, grade = fields
            if number == 1 and grade.lower() in QRELS_HEADER_NAMES:
                continue  # BEIR header "query-id corpus-id score"
        else:
            raise _error(path, number, f"a qrels line has 4 fields (qid 0 docid rel) or 3 (TSV), got {len(fields)}")
        try:
            value = int(grade)
        except ValueError:
            raise _error(path, number, f"relevance {grade!r} is not an integer") from None
        _put(qrels.setdefault(qid, {}), docid, value, lines, (qid, docid), path, number, f"query {qid!r}: document")
    return qrels


def write_qrels(qrels: Qrels, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for qid, docs in qrels.items():
            for docid, grade in docs.items():
                handle.write(f"{qid} 0 {docid} {grade}\n")


def _read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    for number, line in text_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise _error(path, number, f"invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "_id" not in record:
            raise _error(path, number, "a BEIR JSONL record must be an object with an '_id'")
        yield number, record


def read_beir_corpus(path: str | Path) -> dict[str, str]:
    """BEIR ``corpus.jsonl``: {"_id", "title", "text"}; the text is "title text" when titled."""
    corpus: dict[str, str] = {}
    lines: dict = {}
    for number, record in _read_jsonl(path):
        if not isinstance(record.get("text", ""), str):
            raise _error(path, number, "'text' must be a string")
        title, text = record.get("title") or "", record.get("text") or ""
        docid = _id(record["_id"], f"{path}:{number}", "'_id'")
        _put(corpus, docid, f"{title} {text}".strip() if title else text, lines, docid, path, number, "document")
    return corpus


def read_beir_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl``: {"_id", "text"}."""
    queries: dict[str, str] = {}
    lines: dict = {}
    for number, record in _read_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise _error(path, number, "a query record needs a string 'text'")
        qid = _id(record["_id"], f"{path}:{number}", "'_id'")
        _put(queries, qid, record["text"], lines, qid, path, number, "query")
    return queries


def read_tsv_pairs(path: str | Path) -> dict[str, str]:
    """``id\\ttext`` per line: NovelEval corpus.tsv / queries.tsv and BRIGHT topic TSVs."""
    pairs: dict[str, str] = {}
    lines: dict = {}
    for number, line in text_lines(path):
        key, sep, text = line.partition("\t")
        if not sep or not key.strip():
            raise _error(path, number, "expected 'id<TAB>text'")
        _put(pairs, key.strip(), text, lines, key.strip(), path, number, "id")
    return pairs


def read_rank_llm(path: str | Path) -> list[RankLLMQuery]:
    """rank_llm ``retrieve_results`` JSON: ``[{query, hits: [{content, qid, docid, rank, score}]}]``."""
    path = Path(path)
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except gzip.BadGzipFile as err:
            raise ValueError(f"{path}: not a gzip file ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}:1: rank_llm results must be a JSON list of {{query, hits}} objects")
    out, seen = [], {}
    for index, entry in enumerate(data):
        hits = entry.get("hits") if isinstance(entry, dict) else None
        if not isinstance(hits, list) or not isinstance(entry.get("query"), str):
            raise ValueError(f"{path}: entry {index} needs a string 'query' and a list 'hits'")
        docids: dict[str, int] = {}
        for hit_index, hit in enumerate(hits):
            where = f"{path}: entry {index} hit {hit_index}"
            if not isinstance(hit, dict) or not {"content", "docid"} <= hit.keys():
                raise ValueError(f"{where} needs 'content' and 'docid'")
            docid = _id(hit["docid"], where, "'docid'")
            if docid in docids:
                raise ValueError(f"{where}: docid {docid!r} again (first in hit {docids[docid]})")
            docids[docid] = hit_index
            if "qid" in hit and str(hit["qid"]) != str(hits[0].get("qid")):
                raise ValueError(f"{where}: qid {hit['qid']!r}, but the entry's first hit has {hits[0].get('qid')!r}")
        qid = str(hits[0]["qid"]) if hits and "qid" in hits[0] else str(index)
        if qid in seen:  # later entries would silently replace earlier ones downstream
            raise ValueError(f"{path}: entries {seen[qid]} and {index} have the same qid {qid!r}")
        seen[qid] = index
        out.append(RankLLMQuery(qid=qid, query=entry["query"], hits=tuple(hits)))
    return out


def write_rank_llm(entries: list[RankLLMQuery], path: str | Path) -> None:
    data = [{"query": e.query, "hits": list(e.hits)} for e in entries]
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def rank_llm_to_run(entries: list[RankLLMQuery]) -> Run:
    return {e.qid: {str(h["docid"]): float(h.get("score", 0.0)) for h in e.hits} for e in entries}


def read_collection(directory: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(corpus, queries) from a dataset directory: BEIR (corpus.jsonl + queries.jsonl) or
    TSV (corpus.tsv + queries.tsv, e.g. NovelEval)."""
    directory = Path(directory)
    for corpus_name, queries_name, corpus_reader, queries_reader in (
        ("corpus.jsonl", "queries.jsonl", read_beir_corpus, read_beir_queries),
        ("corpus.tsv", "queries.tsv", read_tsv_pairs, read_tsv_pairs),
    ):
        if (directory / corpus_name).is_file() and (directory / queries_name).is_file():
            return corpus_reader(directory / corpus_name), queries_reader(directory / queries_name)
    raise ValueError(
        f"{directory}: expected corpus.jsonl + queries.jsonl (BEIR) or corpus.tsv + queries.tsv (NovelEval)"
    )
