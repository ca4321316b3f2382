"""Request bodies: JSON parsing and type checks (pydantic), turned into 400/413 ``APIError``s.

Shapes: rerank as Cohere v2 / Jina / vLLM / Infinity share it; chat and text completions as
OpenAI's (unknown fields are ignored, as OpenAI-compatible servers do). Limits that depend on the
server's flags (``n``, ``max_tokens``, document count, prompt length) are checked by the handlers.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from grouprank_jax.serve.api_errors import APIError, bad_request

Model = TypeVar("Model", bound=BaseModel)
_TAG = re.compile(r"str|int|float|bool|[A-Z]\w*|\w+\[.*\]")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RerankDocument(_Body):
    text: str
    score: float | None = None  # a first-stage score: fused with the model's score when given


class RerankRequest(_Body):
    model: str | None = None
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The content; OpenAI's list-of-parts form is accepted for text parts only."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class _Sampling(_Body):
    model: str | None = None
    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request("stop: at most 4 non-empty strings", "stop")
        return tuple(stops)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]  # None max_tokens: OpenAI's 16 for /v1/completions (at most --max-new-tokens)


def parse_body(raw: bytes, schema: type[Model], max_bytes: int) -> Model:
    """The validated request, or a 413 (too large) / 400 (not JSON, wrong shape) ``APIError``."""
    if len(raw) > max_bytes:
        raise APIError(
            413, f"request body of {len(raw)} bytes exceeds the limit of {max_bytes}", code="request_too_large"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        # Drop the union-member tags pydantic puts in locations ("documents.0.str" -> "documents.0").
        loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and _TAG.fullmatch(p)))
        code = "missing_field" if first["type"] == "missing" else "invalid_type"
        if first["type"] in ("greater_than_equal", "greater_than", "less_than_equal", "too_short"):
            code = "invalid_value"
        raise bad_request(f"{loc}: {first['msg']}", loc or None, code) from None
