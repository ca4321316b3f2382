"""The teachers' prompts (paper Prompts D.1 and D.2) and the parsers of their answers.

Pointwise (D.1) is the paper-notes' text verbatim, one user message per (query, document).
Listwise (D.2): the notes give its opening ("You are an expert passage reranker..."), its steps
(understand the query, evaluate the passages, briefly explain the reasoning, then a single JSON
array with the integer ids of **all** passages, most to least valuable), the answer shape and its
two closing lines; the connecting wording is INFERRED (written here to say exactly that).
Passages are numbered 1..k in the order they are given (``[i]. text``, the groupwise format of
``task.prompts.format_passages``), and the teacher answers with those numbers.

Parsing rules (documented choices):

- pointwise: the LAST ``Relevance score: X`` (case-insensitive, ``:``/``=``/none, optional
  markdown ``**``), X a number, optionally ``X/10``; else an answer that is only a number or
  ``X/10``. Decimals are rounded half up (``floor(x + 0.5)``: 6.5 -> 7, 6.49 -> 6) [INFERRED];
  a value outside 0..10 is unparsable (no clipping). Unparsable -> None (the stage retries).
- listwise: inside the last ```` ```json ```` block if there is one, else the whole text, the LAST
  JSON array of integers with more than one id (else the last one-id array; ids may also be
  written ``"[3]"`` or ``"3"``); no array, or one
  without any valid id, is a format failure (retried). Otherwise rank_llm's
  ``receive_permutation`` repair: duplicates removed (first kept), ids outside 1..k dropped,
  the missing ids appended in their input order; ``repaired`` says whether anything changed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from grouprank_jax.task.prompts import clean_document, format_passages

# Prompt D.1 (paper-notes §5.2), verbatim; {query} and {passages} are filled in one pass.
POINTWISE_TEMPLATE = (
    "Your task is to rate how relevant and useful the document is for the query. A document is "
    "**relevant and useful** if its content directly helps answer or address the query. A document "
    "is **not relevant or useful** if it does not provide content that helps answer the query, even if "
    "it mentions similar topics. The answer should be 'Relevance score: X.' where X is a number from "
    "0-10. 0 means completely irrelevant, and 10 means highly relevant and provides a complete, useful "
    "answer.\n\nHere is the query: {query}\n\nHere is the document: {passages}\n\nNote that your answer "
    "must ONLY be in the format 'Relevance score: X', where X is a number from 0-10. Don't output "
    "anything else."
)

# Prompt D.2 (paper-notes §5.3). The quoted fragments are the paper's; the rest is INFERRED.
LISTWISE_TEMPLATE = (
    "You are an expert passage reranker. Your task is to rank the provided passages by how valuable "
    "they are for answering the user's query.\n\n"
    "Follow these steps:\n"
    "1. Understand the query: identify what the user needs to know.\n"
    "2. Evaluate the passages: judge how directly and completely each passage helps answer the query.\n"
    "3. Briefly explain your reasoning, then output a single JSON array containing the integer IDs of "
    "**all** provided passages, sorted from most to least valuable.\n\n"
    "The passages are numbered [1] to [{num}]. Your output must look like this:\n"
    "<Your reasoning here>\n```json\n[1, 2, ...]\n```\n\n"
    "The user's query is: {query}\n\n"
    "Here are the passages to evaluate:\n{passages_list}"
)

# The optional reasoning teacher (INFERRED: the paper does not say who wrote the SFT reasoning).
REASON_TEMPLATE = (
    "Here is a search query and {num} documents, each indicated by a numerical identifier []. An expert "
    "has scored each document's usefulness and relevance to the query on a 0-10 scale.\n\n"
    "Query:\n{query}\n\nDocuments:\n{passages_list}Scores: {scores}\n\n"
    "Write the brief reasoning process that leads to exactly these scores: analyse each document's "
    "usefulness and relevance to the query and explain the scoring rationale. Output only the reasoning, "
    "without tags, JSON or a list of final scores."
)

_FIELD = re.compile(r"\{(query|passages|passages_list|num|scores)\}")


def _fill(template: str, **values: str) -> str:
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def pointwise_messages(query: str, document: str, max_doc_chars: int) -> list[dict[str, str]]:
    text = _fill(POINTWISE_TEMPLATE, query=query, passages=clean_document(document, max_doc_chars))
    return [{"role": "user", "content": text}]


def listwise_messages(query: str, documents: Sequence[str], max_doc_chars: int) -> list[dict[str, str]]:
    text = _fill(
        LISTWISE_TEMPLATE,
        query=query,
        num=str(len(documents)),
        passages_list=format_passages(documents, max_doc_chars),
    )
    return [{"role": "user", "content": text}]


def reason_messages(
    query: str, documents: Sequence[str], scores: Sequence[int], max_doc_chars: int
) -> list[dict[str, str]]:
    score_text = json.dumps({f"[{i}]": s for i, s in enumerate(scores, 1)})
    text = _fill(
        REASON_TEMPLATE,
        query=query,
        num=str(len(documents)),
        passages_list=format_passages(documents, max_doc_chars),
        scores=score_text,
    )
    return [{"role": "user", "content": text}]


# ---- pointwise -------------------------------------------------------------------------------

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
# "/10" counts when no digit follows it, directly or after a decimal point ("/100" and "/10.5" are
# another scale; the full stop of "8/10." ends the sentence, as prompt D.1's "Relevance score: X.").
_SCORE = re.compile(r"relevance\s*score\s*\**\s*[:=]?\s*\**\s*" + _NUMBER + r"(\s*/\s*10(?!\d|\.\d))?", re.IGNORECASE)
_BARE = re.compile(r"\s*\**\s*" + _NUMBER + r"(\s*/\s*10)?\s*\**\s*\.?\s*")


def round_score(value: float) -> int | None:
    """Half up (6.5 -> 7); None outside 0..10 or not finite."""
    if not math.isfinite(value) or not 0.0 <= value <= 10.0:
        return None
    return int(math.floor(value + 0.5))


def parse_pointwise(text: str) -> int | None:
    """The 0..10 integer score of a pointwise answer, or None when it has none."""
    if not isinstance(text, str):
        return None
    matches = list(_SCORE.finditer(text))
    if matches:
        last = matches[-1]
        if re.match(r"\s*/", text[last.end() :]):  # "X/100", "X/5": another scale
            return None
        return round_score(float(last.group(1)))
    bare = _BARE.fullmatch(text)
    return round_score(float(bare.group(1))) if bare else None


# ---- listwise --------------------------------------------------------------------------------

_ARRAY = re.compile(r"\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]")
_ID = re.compile(r"\s*\[?\s*(\d{1,6})\s*\]?\s*")


def _as_id(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _ID.fullmatch(value)
        return int(match.group(1)) if match else None
    return None


def extract_id_array(text: str) -> list[int] | None:
    """The last JSON array of ids in the answer (see the module docstring), or None."""
    if not isinstance(text, str):
        return None
    fence = text.rfind("```json")
    if fence >= 0:
        end = text.find("```", fence + 7)
        block = text[fence + 7 : end if end >= 0 else len(text)]
        found = extract_id_array(block) if block.strip() and "```json" not in block else None
        if found is not None:
            return found
    single = None  # "[3]" alone is more often a mention of a passage than the answer
    for candidate in reversed(_ARRAY.findall(text)):
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        if not isinstance(value, list) or not value:
            continue
        ids = [_as_id(v) for v in value]
        if all(i is not None for i in ids):
            if len(ids) > 1:
                return ids  # type: ignore[return-value]
            single = single or ids
    return single  # type: ignore[return-value]


def receive_permutation(ids: Sequence[int], k: int) -> tuple[list[int], bool]:
    """rank_llm's repair: a permutation of 1..k and whether ``ids`` had to be changed."""
    seen: list[int] = []
    for i in ids:
        if 1 <= i <= k and i not in seen:
            seen.append(i)
    full = seen + [i for i in range(1, k + 1) if i not in seen]
    return full, list(ids) != full


def parse_listwise(text: str, k: int) -> tuple[list[int], bool] | None:
    """(permutation of 1..k best first, repaired) or None when no usable id array is found."""
    ids = extract_id_array(text)
    if ids is None or not any(1 <= i <= k for i in ids):
        return None
    return receive_permutation(ids, k)


def parse_reason(text: str) -> str | None:
    """The reasoning text, or None when it is empty or carries the answer format's tags."""
    if not isinstance(text, str):
        return None
    body = text.strip()
    if not body or any(tag in body for tag in ("<reason>", "</reason>", "<answer>", "</answer>")):
        return None
    return body
