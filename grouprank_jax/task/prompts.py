"""The groupwise prompt: presets, document formatting, the token budget and SFT targets.

The ``grouprank`` preset is byte-exact with ``group_system_prompt`` and the inference user
template of the official code (paper-notes §1); the released checkpoints were trained on it, so
do not "tidy" it: several lines end in a space on purpose and the system prompt ends in "\\n".

Templates use ``{TOPK}``, ``{QUERY}`` and ``{PASSAGES}`` placeholders, substituted in one pass
(so a query containing "{PASSAGES}" is never expanded and literal JSON braces need no escaping).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MAX_DOC_CHARS = 3000  # paper-notes §1: a character cut, not a token cut

GROUP_SYSTEM_PROMPT = (
    "Your task is to evaluate and rank documents based on how well they help answer the given query. "
    "Follow this evaluation priority:\n"
    "1. PRIMARY: Usefulness & Helpfulness - Does the document provide actionable information, solutions, "
    "or direct answers that help address the user's needs?\n"
    "2. SECONDARY: Relevance - Does the document contain information related to the query topic?\n"
    "\n"
    "Evaluation Process:\n"
    "1. First, identify the user's core intent and what kind of help they need from the query\n"
    "2. For each document, assess:\n"
    "   - How directly it addresses the user's intent\n"
    "   - What actionable information or answers it provides\n"
    "   - How much it helps solve the user's problem or need\n"
    "3. Compare documents against each other to ensure proper ranking\n"
    "4. Assign scores that reflect the relative usefulness ranking\n"
    "\n"
    "Scoring Scale (0-10):\n"
    "- 9-10: Extremely helpful, directly answers the query with actionable information\n"
    "- 7-8: Very helpful, provides substantial useful information for the query\n"
    "- 5-6: Moderately helpful, contains some useful information but incomplete\n"
    "- 3-4: Minimally helpful, limited useful information despite topic relevance\n"
    "- 1-2: Barely helpful, mentions related topics but provides little useful information\n"
    "- 0: Not helpful at all, cannot assist with answering the query\n"
)

_USER_HEAD = (
    "I will provide you {TOPK} documents, each indicated by a numerical identifier []. "
    "Score these documents based on their Usefulness and Relevance to the query.\n"
)

# The trailing spaces after "documents.", "<reason>", "<answer>" and the closing fence are in
# the official template (paper-notes §1).
GROUP_USER_TEMPLATE = (
    _USER_HEAD + "Query:\n{QUERY}\n\nDocuments:\n{PASSAGES}\n\n"
    "## Final Output Format\n"
    "You must structure your response in exactly two parts: provide your brief reasoning process first, "
    "then output final scores in JSON format like below, with document IDs as string keys and integer "
    "scores as values for all {TOPK} documents. \n"
    "The reasoning process and answer are enclosed within <reason> </reason> and <answer> </answer> tags, "
    "respectively. Do NOT output anything outside the specified tags. Follow this exact format:\n"
    "<reason> \n"
    "[Analyze each document's usefulness and relevance to the query, explaining your scoring rationale]\n"
    "</reason>\n"
    "<answer> \n"
    "```json\n"
    '{"[1]": 5, "[2]": 3, "[3]": 8}\n'
    "``` \n"
    "</answer>"
)

# The SFT data's "instruction" tail (paper-notes §1). Its first line is elided in the notes and
# assumed equal to the inference head (INFERRED).
GROUP_SFT_USER_TEMPLATE = (
    _USER_HEAD + "Query:\n{QUERY}\n\nDocuments:\n{PASSAGES}\n\n"
    "Provide your brief reasoning process first, then output final scores in JSON format like below, "
    "with document IDs as string keys and integer scores as values for all {TOPK} documents.\n"
    "The reasoning process and answer are enclosed within <reason> </reason> and <answer> </answer> tags, "
    "respectively, i.e., \n"
    "<reason>\n"
    "[Analyze each document's usefulness and relevance to the query, explaining your scoring rationale]\n"
    "</reason>\n"
    "<answer> \n"
    "```json\n"
    '{"[1]": 5, "[2]": 3, "[3]": 8}\n'
    "``` \n"
    "</answer>.\n"
)

# A short prompt with the same output contract, so tiny CPU demo models see short sequences.
COMPACT_SYSTEM_PROMPT = "Score each document 0-10 for how well it helps answer the query.\n"
COMPACT_USER_TEMPLATE = (
    "Query: {QUERY}\n\nDocuments:\n{PASSAGES}"
    'Reply as <reason> ... </reason> <answer> ```json {"[1]": 5, ...} ``` </answer> '
    "with integer scores for all {TOPK} documents."
)
# The shortest template: the CPU demo's tiny model learns fastest when little text separates
# the documents from the answer. Same output format.
DEMO_SYSTEM_PROMPT = "Score each document 0-10.\n"
DEMO_USER_TEMPLATE = "Query: {QUERY}\n{PASSAGES}"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A system prompt plus a user template with {TOPK}/{QUERY}/{PASSAGES} placeholders."""

    system: str
    user: str
    name: str = "custom"


PRESETS: dict[str, PromptTemplate] = {
    "grouprank": PromptTemplate(GROUP_SYSTEM_PROMPT, GROUP_USER_TEMPLATE, "grouprank"),
    "grouprank-sft": PromptTemplate(GROUP_SYSTEM_PROMPT, GROUP_SFT_USER_TEMPLATE, "grouprank-sft"),
    "compact": PromptTemplate(COMPACT_SYSTEM_PROMPT, COMPACT_USER_TEMPLATE, "compact"),
    "demo": PromptTemplate(DEMO_SYSTEM_PROMPT, DEMO_USER_TEMPLATE, "demo"),
}

_PLACEHOLDER = re.compile(r"\{(TOPK|QUERY|PASSAGES)\}")


def load_template(name_or_path: str = "grouprank") -> PromptTemplate:
    """A preset by name, or a YAML/JSON file with ``system`` and ``user`` string keys."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"prompt template {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    text = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("system", "user")):
        raise ValueError(f"{path}: a prompt template needs string keys 'system' and 'user'")
    if "{PASSAGES}" not in data["user"]:
        raise ValueError(f"{path}: the 'user' template must contain the {{PASSAGES}} placeholder")
    return PromptTemplate(data["system"], data["user"], name=str(path))


def clean_document(text: str, max_chars: int = DEFAULT_MAX_DOC_CHARS) -> str:
    """Newline runs become one space, then a character cut (the official formatting)."""
    return re.sub("\n+", " ", text)[:max_chars]


def format_passages(docs: Sequence[str], max_doc_chars: int = DEFAULT_MAX_DOC_CHARS) -> str:
    """``[1]. text\\n\\n[2]. text\\n\\n...``: ids are local to the group, 1-based."""
    return "".join(f"[{i}]. {clean_document(d, max_doc_chars)}\n\n" for i, d in enumerate(docs, 1))


def fill_template(template: str, *, topk: int, query: str, passages: str) -> str:
    values = {"TOPK": str(topk), "QUERY": query, "PASSAGES": passages}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def build_messages(
    query: str,
    docs: Sequence[str],
    template: PromptTemplate | None = None,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
) -> list[dict[str, str]]:
    """The [system, user] chat messages for one group."""
    template = template or PRESETS["grouprank"]
    user = fill_template(template.user, topk=len(docs), query=query, passages=format_passages(docs, max_doc_chars))
    return [{"role": "system", "content": template.system}, {"role": "user", "content": user}]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_tokens(tokenizer: Any, text: str) -> int:
    # The chat text already carries its special tokens; do not let the tokenizer add more.
    return len(tokenizer.encode(text, add_special_tokens=False))


def render_prompt(
    tokenizer: Any,
    query: str,
    docs: Sequence[str],
    template: PromptTemplate | None = None,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    max_prompt_len: int | None = None,
) -> str:
    """The chat prompt string for one group, within ``max_prompt_len`` tokens when given.

    Over budget, every document is cut to one common character cap, the largest that fits
    (binary search), so no document is sacrificed for another.
    """

    def render(cap: int) -> str:
        return render_chat(tokenizer, build_messages(query, docs, template, cap))

    prompt = render(max_doc_chars)
    if max_prompt_len is None or count_tokens(tokenizer, prompt) <= max_prompt_len:
        return prompt
    empty = render(0)
    empty_len = count_tokens(tokenizer, empty)
    if empty_len > max_prompt_len:
        raise ValueError(
            f"the prompt needs {empty_len} tokens with empty documents (query + template + {len(docs)} ids) "
            f"but max_prompt_len is {max_prompt_len}; raise max_prompt_len, shorten the query, use a "
            "smaller group size or the 'compact' template"
        )
    lo, hi, best = 0, max_doc_chars - 1, empty  # invariant: cap lo fits, max_doc_chars does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = render(mid)
        if count_tokens(tokenizer, candidate) <= max_prompt_len:
            lo, best = mid, candidate
        else:
            hi = mid - 1
    return best


def format_target(scores: Sequence[int], reasoning: str) -> str:
    """The SFT completion: reasoning, a blank line, then a multi-line JSON answer (§1)."""
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 10:
            raise ValueError(f"SFT target scores must be integers in 0..10, got {s!r} in {list(scores)}")
    body = json.dumps({f"[{i}]": s for i, s in enumerate(scores, 1)}, indent=2)
    return f"<reason> {reasoning.strip()} </reason>\n\n<answer>\n```json\n{body}\n```\n</answer>"
