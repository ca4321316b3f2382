"""Training record schemas: validation with file:line errors, and loading into a `datasets.Dataset`.

Two record kinds are accepted (one JSON object per JSONL line, or one Parquet row):

* chat — ``{"system": str?, "prompt": str, "output": str}``. The swift/alpaca spelling
  ``{"instruction": str, "input": str?, "output": str}`` is also accepted (paper-notes §1: the
  released SFT data uses "instruction"); the prompt is then ``instruction + "\\n" + input``.
* grouprank — ``{"query": str, "documents": [str | {"docid": str, "text": str}],
  "scores": [int 0..10 per document]?, "reasoning": str?, "gold": [number per document]?}``.
  ``scores`` is the SFT target; ``gold`` is the RL relevance label and defaults to ``scores``.

Every record is normalised to one canonical dict (``CANONICAL_FIELDS``; absent fields are None),
so chat and grouprank records can share one Arrow table and consumers never re-check forms:
documents always become ``[{"docid", "text"}]`` (a bare string gets its 1-based position as
docid), ``gold`` becomes floats, and ``source`` keeps ``"file:line"`` so later stages (e.g. the
tokenizer's length check) can still point at the offending line.

Malformed records are never skipped: the first one raises ``DataError("file:line: ...")``.
For Parquet the number is the 1-based row index.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

KINDS = ("chat", "grouprank")
# "sft" accepts chat records and grouprank records that carry scores (the target);
# "rl" accepts grouprank records with gold labels (or scores, used as gold).
PURPOSES = ("sft", "rl")
MAX_SCORE = 10
CANONICAL_FIELDS = (
    "kind",
    "source",
    "system",
    "prompt",
    "output",
    "query",
    "documents",
    "scores",
    "gold",
    "reasoning",
)

# Fields the two record kinds read, plus provenance `grouprank synth` writes (qid, fused_rank).
# Any other field is reported once per file: a misspelt name ("scroes", "glod") is not read.
KNOWN_FIELDS = frozenset(
    {"system", "prompt", "instruction", "input", "output", "query", "documents", "scores", "gold", "reasoning"}
    | {"qid", "fused_rank", "id", "source"}
)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed training record or data file; the message starts with ``file:line:``."""


# ---- validation of one record -----------------------------------------------------------------


def _get(row: Mapping[str, Any], key: str) -> Any:
    # JSON null and a missing key mean the same thing (Arrow fills absent columns with None).
    return row.get(key)


def _opt_str(row, key, where) -> str | None:
    value = _get(row, key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _req_str(row, key, where, hint: str) -> str:
    value = _get(row, key)
    if value is None:
        raise DataError(f"{where}: missing required field {key!r} ({hint})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _chat(row, where) -> dict[str, Any]:
    if _get(row, "prompt") is not None:
        prompt = _req_str(row, "prompt", where, "the user turn")
    else:
        prompt = _req_str(row, "instruction", where, "the user turn; or use 'prompt'")
        extra = _opt_str(row, "input", where)
        if extra:
            prompt = f"{prompt}\n{extra}"
    return {
        "kind": "chat",
        "system": _opt_str(row, "system", where),
        "prompt": prompt,
        "output": _req_str(row, "output", where, "the assistant target text"),
    }


def _documents(row, where) -> list[dict[str, str]]:
    docs = _get(row, "documents")
    if docs is None:
        raise DataError(
            f"{where}: missing required field 'documents' (a list of strings or {{'docid', 'text'}} objects)"
        )
    if not isinstance(docs, (list, tuple)) or not docs:
        raise DataError(f"{where}: field 'documents' must be a non-empty list, got {docs!r:.80}")
    out, first_index = [], {}
    for i, doc in enumerate(docs):
        if isinstance(doc, Mapping) and isinstance(doc.get("docid"), str):
            if doc["docid"] in first_index:  # a run keyed by docid would keep only one of them
                raise DataError(
                    f"{where}: documents[{i}] has docid {doc['docid']!r} again (documents[{first_index[doc['docid']]}])"
                )
            first_index[doc["docid"]] = i
        if isinstance(doc, str):
            out.append({"docid": str(i + 1), "text": doc})
        elif isinstance(doc, Mapping):
            docid, text = doc.get("docid"), doc.get("text")
            if not isinstance(docid, str) or not isinstance(text, str):
                raise DataError(
                    f"{where}: documents[{i}] needs string 'docid' and 'text', got "
                    f"docid={docid!r:.40} text={type(text).__name__}"
                )
            out.append({"docid": docid, "text": text})
        else:
            raise DataError(
                f"{where}: documents[{i}] must be a string or a {{'docid', 'text'}} object, got {type(doc).__name__}"
            )
    return out


def _per_doc_list(row, key, where, n_docs) -> list | None:
    values = _get(row, key)
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{where}: field {key!r} must be a list, got {type(values).__name__}")
    if len(values) != n_docs:
        raise DataError(
            f"{where}: field {key!r} has {len(values)} entries but 'documents' has "
            f"{n_docs}; give exactly one per document, in document order"
        )
    return list(values)


def _scores(row, where, n_docs) -> list[int] | None:
    scores = _per_doc_list(row, "scores", where, n_docs)
    if scores is None:
        return None
    for i, s in enumerate(scores):
        # bool is an int subclass; True as a score is almost certainly a bug upstream.
        if isinstance(s, bool) or not isinstance(s, int):
            raise DataError(f"{where}: scores[{i}] = {s!r} must be an integer 0..{MAX_SCORE}")
        if not 0 <= s <= MAX_SCORE:
            raise DataError(f"{where}: scores[{i}] = {s} is outside 0..{MAX_SCORE}")
    return [int(s) for s in scores]


def _gold(row, where, n_docs) -> list[float] | None:
    gold = _per_doc_list(row, "gold", where, n_docs)
    if gold is None:
        return None
    for i, g in enumerate(gold):
        # Gold may be graded teacher scores or fused rank scores (paper-notes §5), so any finite
        # real is accepted; the reward decides how to turn it into gains.
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            raise DataError(f"{where}: gold[{i}] = {g!r} must be a finite number")
    return [float(g) for g in gold]


def _grouprank(row, where, purpose) -> dict[str, Any]:
    query = _req_str(row, "query", where, "the search query")
    docs = _documents(row, where)
    scores = _scores(row, where, len(docs))
    gold = _gold(row, where, len(docs))
    if purpose == "sft" and scores is None:
        raise DataError(f"{where}: missing required field 'scores' (the SFT target: one 0..10 integer per document)")
    if gold is None and scores is not None:
        gold = [float(s) for s in scores]
    if purpose == "rl" and gold is None:
        raise DataError(f"{where}: an RL record needs 'gold' (or 'scores') with one label per document")
    return {
        "kind": "grouprank",
        "query": query,
        "documents": docs,
        "scores": scores,
        "gold": gold,
        "reasoning": _opt_str(row, "reasoning", where),
        "system": _opt_str(row, "system", where),
    }


def normalize_record(row: Any, where: str, purpose: str = "sft") -> dict[str, Any]:
    """Validate one raw record and return its canonical dict; raise ``DataError`` naming ``where``."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r}; choose one of {PURPOSES}")
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    is_group = _get(row, "query") is not None or _get(row, "documents") is not None
    is_chat = any(_get(row, k) is not None for k in ("prompt", "instruction", "output"))
    if is_group and is_chat:
        raise DataError(
            f"{where}: record mixes chat fields (prompt/instruction/output) with "
            "grouprank fields (query/documents); use one kind per record"
        )
    if is_group:
        rec = _grouprank(row, where, purpose)
    elif is_chat:
        if purpose == "rl":
            raise DataError(f"{where}: RL needs grouprank records (query, documents, gold); this is a chat record")
        rec = _chat(row, where)
    else:
        raise DataError(
            f"{where}: unrecognised record with keys {sorted(row)[:8]}; expected "
            "chat {prompt|instruction, output} or grouprank {query, documents, scores}"
        )
    canonical = dict.fromkeys(CANONICAL_FIELDS)
    canonical.update(rec, source=where)
    return canonical


def records_from_rows(rows: Sequence[Any], purpose: str = "sft", name: str = "<memory>") -> list[dict[str, Any]]:
    """Validate in-memory rows (errors read ``name:index`` with a 1-based index)."""
    return [normalize_record(row, f"{name}:{i + 1}", purpose) for i, row in enumerate(rows)]


# ---- reading files ----------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # Parsed line by line ourselves: `datasets`' JSON reader reports a bad line as an opaque
    # Arrow error without the line number.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({err.msg} at column "
                    f"{err.pos + 1}); each line must be one JSON object "
                    "(JSON Lines)"
                ) from None
            yield f"{path}:{lineno}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    row_number = 0
    for batch in file.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            row_number += 1
            yield f"{path}:{row_number}", row


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .parquet")


def iter_records(paths: Sequence[str | os.PathLike], purpose: str = "sft") -> Iterator[dict]:
    """Yield canonical records from JSONL/Parquet files, validating each (streaming, no cache)."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        unread: dict[str, str] = {}  # field -> where it first appeared
        for where, row in _file_rows(path):
            record = normalize_record(row, where, purpose)
            for key in row:
                if key not in KNOWN_FIELDS and key not in unread:
                    unread[key] = where
            yield record
        if unread:
            log.warning(
                "%s: records carry fields training does not read (a misspelt name is ignored, not used): %s",
                path,
                ", ".join(f"{key!r} (first at {where})" for key, where in sorted(unread.items())),
            )


def _generate(paths: list[str], purpose: str, stamps: list[tuple[int, int]]) -> Iterator[dict]:
    # `stamps` is unused here; it only enters the `datasets` cache fingerprint, so editing a
    # file (new size or mtime) invalidates the cached Arrow table.
    del stamps
    yield from iter_records(paths, purpose)


def _features():
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "kind": text,
            "source": text,
            "system": text,
            "prompt": text,
            "output": text,
            "query": text,
            "documents": datasets.List({"docid": text, "text": text}),
            "scores": datasets.List(datasets.Value("int32")),
            "gold": datasets.List(datasets.Value("float64")),
            "reasoning": text,
        }
    )


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike], purpose: str = "sft", cache_dir: str | None = None
):
    """Validate JSONL/Parquet files and load them as a memory-mapped ``datasets.Dataset``.

    Rows are canonical dicts (see module doc). One streaming pass validates and writes Arrow, so
    large files never sit in Python memory; the first malformed record raises ``DataError``.
    """
    import datasets

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(Path(p).resolve()) for p in paths]
    if not paths:
        raise DataError("no data files given")
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"{p}: file not found")
    stamps = [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    try:
        ds = datasets.Dataset.from_generator(
            _generate,
            features=_features(),
            cache_dir=cache_dir,
            gen_kwargs={"paths": paths, "purpose": purpose, "stamps": stamps},
        )
    except datasets.exceptions.DatasetGenerationError as err:
        # `datasets` wraps exceptions raised inside the generator; surface ours unchanged.
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise
    if len(ds) == 0:
        raise DataError(f"{', '.join(paths)}: no records found")
    return ds
