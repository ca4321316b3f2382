"""The Qwen2.5 tokenizer, built offline from the bundled ``vocab.json`` / ``merges.txt``.

Why this exists: training/eval nodes have no hub access, and the bundled files carry only the
151,643 BPE tokens. The 22 added tokens, the special-token flags and the ChatML template live in
Qwen's ``tokenizer_config.json``, which is not bundled, so they are reconstructed here. Provenance
of the data files is recorded in ``NOTICE`` at the repository root.

transformers 5.x notes: ``Qwen2TokenizerFast is Qwen2Tokenizer``, and its constructor takes the
parsed ``vocab=`` dict and ``merges=`` list. ``vocab_file=`` is silently ignored there (you get a
1-token tokenizer), so the files are parsed here. ``Qwen2Tokenizer`` itself installs the right
pipeline: NFC normalizer, Qwen2 split regex + ByteLevel(add_prefix_space=False, use_regex=False)
pre-tokenizer, ByteLevel decoder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

ENDOFTEXT_ID = 151643  # pad token; end of a pretraining document
IM_START_ID = 151644
IM_END_ID = 151645  # eos of the Instruct (chat) models
NUM_BPE_TOKENS = 151643
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The 22 added tokens in id order (151643..151664) with Qwen2.5's ``special`` flag from its
# ``added_tokens_decoder``. Special tokens are skipped by ``decode(skip_special_tokens=True)``.
# The tool-call, FIM and repo tokens are added (never split by BPE) but NOT special in Qwen2.5, so
# they survive decoding: tool calls and code-completion markers stay visible in generated text.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Qwen2.5 lists the special ones other than <|endoftext|> as additional_special_tokens
# (transformers 5 calls them extra_special_tokens).
EXTRA_SPECIAL_TOKENS = [t for t, special in ADDED_TOKENS[1:] if special]

# Qwen2.5-Instruct ChatML behaviour, rewritten compactly: a system turn is always emitted (the
# default Qwen system prompt when messages[0] is not a system message), each turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n", and add_generation_prompt opens an assistant turn.
# The upstream ``tools`` / ``tool_calls`` / role "tool" branches are deliberately omitted (the
# reranker never uses function calling); the template raises instead of silently diverging.
CHAT_TEMPLATE = (
    "{%- if tools %}{{ raise_exception('grouprank_jax chat template omits the Qwen tools branch') }}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] in ['user', 'assistant', 'system'] and not message.get('tool_calls') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ raise_exception('unsupported chat message (role ' + message['role'] + '); tool messages are omitted') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def stop_token_ids() -> tuple[int, ...]:
    """Ids that end generation: <|im_end|> for chat turns, <|endoftext|> as the pretraining fallback."""
    return (IM_END_ID, ENDOFTEXT_ID)


def _read_assets(asset_dir: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_path, merges_path = asset_dir / "vocab.json", asset_dir / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"bundled tokenizer file {p} is missing; reinstall grouprank-jax with its package data "
                "or pass load_tokenizer(path=<local HF tokenizer dir>)"
            )
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    if len(vocab) != NUM_BPE_TOKENS:
        raise ValueError(f"{vocab_path} has {len(vocab)} tokens, expected {NUM_BPE_TOKENS} (Qwen2.5)")
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            left, right = line.split(" ")  # byte-level symbols never contain a space (it is "Ġ")
            merges.append((left, right))
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _bundled_tokenizer():
    """Build once per process: parsing 150k merges takes a few seconds."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _read_assets(ASSET_DIR)
    # Put the added tokens in the BPE vocab at their fixed ids. Otherwise ids are assigned in
    # insertion order, and the constructor registers eos/pad first, which would misnumber them.
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        vocab[token] = NUM_BPE_TOKENS + offset
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,  # Qwen2.5 has no unk token: byte-level BPE covers every input
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    tok.add_tokens(
        [
            AddedToken(t, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t, special in ADDED_TOKENS
        ]
    )
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(token)
        if got != NUM_BPE_TOKENS + offset:
            raise RuntimeError(f"{token} got id {got}, expected {NUM_BPE_TOKENS + offset}; transformers changed?")
    return tok


def load_tokenizer(path: str | Path | None = None):
    """Return the Qwen2.5 tokenizer: the bundled one (``path=None``) or a local HF tokenizer dir.

    The bundled instance is cached and shared; do not mutate it (add tokens, change padding side)
    in place - ``copy.deepcopy`` it first.
    """
    if path is None:
        return _bundled_tokenizer()
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; pass a local directory holding tokenizer.json / "
            "tokenizer_config.json (hub ids are not fetched), or path=None for the bundled Qwen2.5 tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """Write ``tok`` so ``transformers.AutoTokenizer.from_pretrained(out_dir)`` reloads it identically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
