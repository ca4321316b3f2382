"""SFT records rendered as chat turns (grain pickles the renderer, hence a dataclass)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from grouprank_jax.task.prompts import build_messages, format_target, load_template


@dataclasses.dataclass(frozen=True)
class GroupRankRender:
    """GroupRank record -> chat turn: the groupwise prompt and the ``<reason>/<answer>`` target.

    A class (not a closure) so grain can pickle it. Documents are kept in record order; the
    data generator shuffles them (paper-notes §5: documents are shuffled in the prompt).
    """

    preset: str = "grouprank"
    max_doc_chars: int = 3000
    default_reasoning: str = "I compare each document with the query and score its usefulness."

    def __call__(self, record: Mapping[str, Any]) -> dict[str, str]:
        if record.get("kind") == "chat" or record.get("prompt") is not None:
            return {"system": record.get("system"), "prompt": record["prompt"], "output": record["output"]}
        docs = [d["text"] if isinstance(d, Mapping) else str(d) for d in record["documents"]]
        messages = build_messages(record["query"], docs, load_template(self.preset), self.max_doc_chars)
        scores = [int(round(s)) for s in record["scores"]]
        reasoning = record.get("reasoning") or self.default_reasoning
        return {
            "system": messages[0]["content"],
            "prompt": messages[1]["content"],
            "output": format_target(scores, reasoning),
        }
