"""``grouprank serve``: serve a model over HTTP: ``/v1/rerank``, ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics`` (README "Serving")."""

from __future__ import annotations

import argparse
import dataclasses

from grouprank_jax.commands import seed_int
from grouprank_jax.errors import UserError
from grouprank_jax.serve.config import ServeConfig


def register(subparsers) -> None:
    d = ServeConfig(model="")
    p = subparsers.add_parser("serve", help="serve a reranker over HTTP (rerank + OpenAI-compatible APIs)")
    p.add_argument("--model", required=True, help="HF directory, import-hf checkpoint or training run directory")
    p.add_argument("--served-model-name", help="the model id clients use (default: the model directory's name)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the bundled Qwen2.5 tokenizer)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--mesh", help="data,fsdp,tensor over all devices (default: one device)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="generations per generate call")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="wait for more requests to batch")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="generations queued or running (then 429)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit (then 413)")
    p.add_argument("--max-prompt-len", type=int, default=d.max_prompt_len, help="prompt token budget")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="rerank budget; max_tokens cap")
    p.add_argument("--max-n", type=int, default=d.max_n, help="cap on a request's n")
    p.add_argument("--max-documents", type=int, default=d.max_documents, help="cap on a rerank request's documents")
    p.add_argument("--api-key-env", help="environment variable holding the API key (default: no auth)")
    p.add_argument("--prompt", default=d.prompt, help="rerank prompt preset or YAML/JSON file")
    p.add_argument("--group-size", type=int, default=d.group_size, help="documents per group (c)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="shuffled passes averaged")
    p.add_argument("--fusion-weight", type=float, default=d.fusion_weight, help="w when documents carry scores")
    p.add_argument("--max-doc-chars", type=int, default=d.max_doc_chars, help="character cut per document")
    p.add_argument("--temperature", type=float, default=d.temperature, help="rerank sampling (0 = greedy)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="rerank sampling")
    p.add_argument("--top-k", type=int, default=d.top_k, help="rerank sampling (0 disables)")
    p.add_argument("--seed", type=seed_int, default=d.seed, help="rerank shuffling and sampling seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from grouprank_jax.serve.server import serve
    except ImportError as err:
        raise UserError(f"grouprank serve needs the serve extra ({err}): pip install 'grouprank-jax[serve]'") from None

    names = {f.name for f in dataclasses.fields(ServeConfig)}
    return serve(ServeConfig(**{k: v for k, v in vars(args).items() if k in names}))
