"""``grouprank generate``: sample completions for a JSONL file of prompts.

Each input line is one of ``{"prompt": str}`` (tokenized as-is, no chat template),
``{"messages": [...]}`` (rendered with the tokenizer's chat template and a generation prompt)
or ``{"prompt_ids": [int, ...]}``. Each output line is one sample:
``{"prompt_index", "sample_index", "text", "token_ids", "logprobs", "finish_reason"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import jinja2

from grouprank_jax.commands import positive_int, seed_int
from grouprank_jax.data.formats import text_lines
from grouprank_jax.sampling import Sampler, SamplingParams
from grouprank_jax.tokenizer import load_tokenizer
from grouprank_jax.weights.loading import load_model

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample completions for a JSONL file of prompts")
    p.add_argument("--model", required=True, help="HF directory, import-hf checkpoint or training run directory")
    p.add_argument(
        "--prompts", required=True, help='JSONL: {"prompt": str} | {"messages": [...]} | {"prompt_ids": [...]}'
    )
    p.add_argument("--out", required=True, help="output JSONL, one line per sample")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the bundled Qwen2.5 tokenizer)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-len", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generate call")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. --stop '</answer>'")
    p.set_defaults(func=run)


def read_prompts(path: str | Path, tokenizer, max_prompt_len: int | None = None) -> tuple[list[list[int]], list[str]]:
    """(token-id prompts, their ``file:line``) from a JSONL file; a malformed line, or a prompt
    over ``max_prompt_len`` tokens, raises ValueError naming file:line (before any model loads)."""
    prompts, sources = [], []
    for lineno, line in text_lines(path):  # a non-UTF-8 byte is named with its line
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if isinstance(record.get("prompt_ids"), list) and all(isinstance(t, int) for t in record["prompt_ids"]):
            ids = record["prompt_ids"]
        elif isinstance(record.get("prompt"), str):
            ids = tokenizer.encode(record["prompt"], add_special_tokens=False)
        elif isinstance(record.get("messages"), list):
            try:
                text = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
            except (TypeError, KeyError, ValueError, jinja2.TemplateError) as err:
                # e.g. a message without "content" (UndefinedError) or with a role the
                # template refuses (its raise_exception: TemplateError)
                raise ValueError(f"{where}: cannot render 'messages' with the chat template ({err})") from err
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            raise ValueError(
                f'{where}: expected "prompt" (string), "messages" (list of {{role, content}}) '
                f'or "prompt_ids" (list of ints); got keys {sorted(record)}'
            )
        if not ids:
            raise ValueError(f"{where}: the prompt is empty")
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            raise ValueError(f"{where}: the prompt has {len(ids)} tokens, over --max-prompt-len {max_prompt_len}")
        prompts.append(list(ids))
        sources.append(where)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts, sources


def run(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    prompts, sources = read_prompts(args.prompts, tokenizer, args.max_prompt_len)
    model = load_model(args.model)
    vocab = model.cfg.vocab_size
    for ids, where in zip(prompts, sources):
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"{where}: prompt_ids outside the model's vocabulary [0, {vocab})")
    sampler = Sampler(
        model, tokenizer=tokenizer, max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens
    )
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        n=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
    )
    total_tokens, total_seconds = 0, 0.0
    with open(args.out, "w", encoding="utf-8") as out:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            # Prompt i draws from (seed, i) whatever --batch-size cuts the file into.
            streams = [(args.seed, start + k) for k in range(len(chunk))]
            result = sampler.generate(chunk, params, streams=streams)
            for row in range(len(chunk) * args.n):
                length = int(result.lengths[row])
                out.write(
                    json.dumps(
                        {
                            "prompt_index": start + row // args.n,
                            "sample_index": row % args.n,
                            "text": result.texts[row],
                            "token_ids": result.tokens[row, :length].tolist(),
                            "logprobs": [round(float(x), 6) for x in result.logprobs[row, :length]],
                            "finish_reason": result.finish_reasons[row],
                        }
                    )
                    + "\n"
                )
            total_tokens += result.stats.generated_tokens
            total_seconds += result.stats.prefill_seconds + result.stats.decode_seconds
    print(
        f"{len(prompts)} prompts x {args.n} samples | {total_tokens} tokens in {total_seconds:.1f} s "
        f"({total_tokens / max(total_seconds, 1e-9):.1f} tok/s) -> {args.out}"
    )
    return 0
