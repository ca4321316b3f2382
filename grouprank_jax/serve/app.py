"""The FastAPI application: routes, API-key check, body limits, error bodies and request counting.

Handlers never touch JAX: they parse and validate on the event loop, then run the blocking part
(tokenizing, ``rerank``'s passes, waiting for the engine) on a handler thread while the loop
watches the connection; a client that disconnects sets its request's cancel event, and the
engine drops its generations that have not started yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from grouprank_jax.serve.api_errors import APIError, ClientGone, internal_error
from grouprank_jax.serve.completions import chat_completion, text_completion
from grouprank_jax.serve.engine import Engine
from grouprank_jax.serve.metrics import Metrics
from grouprank_jax.serve.rerank import rerank_documents
from grouprank_jax.serve.schemas import ChatRequest, CompletionRequest, RerankRequest, parse_body
from grouprank_jax.task.prompts import load_template

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1


def create_app(engine: Engine, metrics: Metrics) -> FastAPI:
    cfg = engine.cfg
    name = cfg.model_name
    api_key = cfg.api_key()
    template = load_template(cfg.prompt)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Handler threads mostly wait on the engine; let as many wait as the queue can hold.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, cfg.max_queue + 8)
        yield

    app = FastAPI(title="grouprank serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err: APIError, request_id: str) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers={"x-request-id": request_id})

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    def too_large(size: int) -> APIError:
        return APIError(
            413,
            f"the request body ({size} bytes or more) exceeds the limit of {cfg.max_body_bytes} (--max-body-bytes)",
            code="request_too_large",
        )

    async def read_body(request: Request) -> bytes:
        """The body; 413 as soon as it is known to exceed ``--max-body-bytes`` (never read further)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise too_large(size)
        return b"".join(chunks)

    async def watch(request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    async def serve_json(request: Request, endpoint: str, schema, work: Callable[..., dict[str, Any]]):
        request_id = uuid.uuid4().hex[:16]
        cancel = threading.Event()
        try:
            check_key(request)
            body = parse_body(await read_body(request), schema, cfg.max_body_bytes)
            if body.model is not None and body.model != name:
                raise APIError(
                    404,
                    f"model {body.model!r} is not served here; this server serves {name!r}",
                    type="not_found_error",
                    param="model",
                    code="model_not_found",
                )
            watcher = asyncio.create_task(watch(request, cancel))
            try:
                result = await run_in_threadpool(
                    work, body, engine=engine, model_name=name, request_id=request_id, cancel=cancel
                )
            finally:
                watcher.cancel()
            if cancel.is_set():
                raise ClientGone()
            response = JSONResponse(result, headers={"x-request-id": request_id})  # serializes here
        except APIError as err:
            if isinstance(err, ClientGone):
                log.info("request %s (%s): the client disconnected", request_id, endpoint)
            metrics.request(endpoint, err.status, err.type)
            return error_response(err, request_id)
        except Exception:
            log.exception("request %s (%s) failed", request_id, endpoint)
            err = internal_error(request_id)
            metrics.request(endpoint, err.status, err.type)
            return error_response(err, request_id)
        metrics.request(endpoint, 200)
        return response

    def rerank_work(body, **kwargs):
        return rerank_documents(body, template=template, **kwargs)

    @app.post("/v1/rerank")
    @app.post("/rerank")
    async def rerank(request: Request):
        return await serve_json(request, "rerank", RerankRequest, rerank_work)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve_json(request, "chat", ChatRequest, chat_completion)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve_json(request, "completions", CompletionRequest, text_completion)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except APIError as err:
            metrics.request("models", err.status, err.type)
            return error_response(err, uuid.uuid4().hex[:16])
        metrics.request("models", 200)
        card = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "grouprank",
            "root": cfg.model,
            "max_model_len": cfg.max_prompt_len + cfg.max_new_tokens,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind)
        metrics.request("other", err.status, err.type)
        return error_response(err, uuid.uuid4().hex[:16])

    return app
