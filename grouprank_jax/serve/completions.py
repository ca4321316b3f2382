"""``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI shapes, no streaming).

Chat messages are rendered with the bundled ChatML template (``task.prompts.render_chat``) plus
a generation prompt; a completion prompt is tokenized as is (as ``grouprank generate``). ``n``
samples of a prompt are n rows of the batch. A prompt over ``--max-prompt-len`` tokens is
rejected (400, code ``context_length_exceeded``), never truncated.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from grouprank_jax.serve.api_errors import bad_request
from grouprank_jax.serve.engine import Engine, GenSettings
from grouprank_jax.serve.schemas import ChatRequest, CompletionRequest
from grouprank_jax.task.prompts import render_chat

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: --max-new-tokens)


def _limits(req, engine: Engine, max_tokens: int | None) -> tuple[int, int]:
    cfg = engine.cfg
    if req.stream:
        raise bad_request("stream=true is not supported; send stream=false", "stream", "unsupported")
    if req.n > cfg.max_n:
        raise bad_request(f"n={req.n} exceeds the limit of {cfg.max_n} (--max-n)", "n")
    max_tokens = cfg.max_new_tokens if max_tokens is None else max_tokens
    if max_tokens > cfg.max_new_tokens:
        raise bad_request(f"max_tokens={max_tokens} exceeds the limit of {cfg.max_new_tokens}", "max_tokens")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    if not 0 <= seed < 2**32:
        raise bad_request(f"seed={seed} must be in [0, 2**32)", "seed")
    return max_tokens, seed


def _encode(engine: Engine, text: str, param: str) -> list[int]:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    limit = engine.cfg.max_prompt_len
    if not ids:
        raise bad_request("the prompt is empty", param)
    if len(ids) > limit:
        raise bad_request(
            f"the prompt has {len(ids)} tokens, over the limit of {limit} (--max-prompt-len)",
            param,
            "context_length_exceeded",
        )
    return ids


def _run(engine: Engine, req, prompts: list[list[int]], max_tokens: int, seed: int, cancel):
    settings = GenSettings.make(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=0,
        max_tokens=max_tokens,
        stop=req.stop_strings(),
        cap=engine.cfg.max_new_tokens,
    )
    rows = [p for p in prompts for _ in range(req.n)]  # prompt-major: row i * n + j
    gens = engine.generate(rows, settings, max_tokens, seed, cancel)
    completion = sum(len(g.token_ids) for g in gens)
    prompt_tokens = sum(len(p) for p in prompts)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    return gens, usage


def chat_completion(
    req: ChatRequest, *, engine: Engine, model_name: str, request_id: str, cancel: threading.Event | None = None
) -> dict[str, Any]:
    max_tokens, seed = _limits(req, engine, req.max_completion_tokens or req.max_tokens)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = render_chat(engine.tokenizer, messages)
    except Exception as err:  # jinja's TemplateError: an unsupported role or message layout
        raise bad_request(f"cannot render the messages with the chat template: {err}", "messages") from None
    gens, usage = _run(engine, req, [_encode(engine, text, "messages")], max_tokens, seed, cancel)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": g.text},
            "finish_reason": g.finish_reason,
            "logprobs": None,
        }
        for i, g in enumerate(gens)
    ]
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": usage,
    }


def text_completion(
    req: CompletionRequest, *, engine: Engine, model_name: str, request_id: str, cancel: threading.Event | None = None
) -> dict[str, Any]:
    default = min(COMPLETIONS_DEFAULT_MAX_TOKENS, engine.cfg.max_new_tokens)
    max_tokens, seed = _limits(req, engine, default if req.max_tokens is None else req.max_tokens)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not texts:
        raise bad_request("prompt must not be an empty list", "prompt")
    gens, usage = _run(engine, req, [_encode(engine, t, "prompt") for t in texts], max_tokens, seed, cancel)
    choices = [
        {"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None} for i, g in enumerate(gens)
    ]
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": usage,
    }
