"""Prompt presets (byte-exact vs paper-notes §1), rendering, the token budget and SFT targets."""

from __future__ import annotations

import json
import re

import pytest

from grouprank_jax.task import prompts

from conftest import shared_path


def _code_block_after(text: str, heading: str) -> str:
    start = text.index(heading)
    block = re.search(r"```\n(.*?)\n```\n", text[start:], re.DOTALL)
    return block.group(1)


def test_presets_are_byte_exact_with_the_notes():
    notes = shared_path("docs", "paper-notes.md").read_text(encoding="utf-8")
    system = _code_block_after(notes, "### System prompt") + "\n"  # "(The string ends with a newline.)"
    assert prompts.GROUP_SYSTEM_PROMPT == system
    user = _code_block_after(notes, "### User prompt at inference").replace("{{", "{").replace("}}", "}")
    assert prompts.GROUP_USER_TEMPLATE == user
    for marker in ("documents. \n", "<reason> \n", "<answer> \n", "``` \n"):
        assert marker in prompts.GROUP_USER_TEMPLATE


class CharTokenizer:
    """Minimal stand-in: one token per character, ChatML-like rendering."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"

    def encode(self, text, add_special_tokens=True):
        return list(text)


def test_user_prompt_layout():
    messages = prompts.build_messages("what {PASSAGES}?", ["one\n\ntwo", "three"], max_doc_chars=5)
    assert messages[0] == {"role": "system", "content": prompts.GROUP_SYSTEM_PROMPT}
    user = messages[1]["content"]
    assert user.startswith("I will provide you 2 documents")
    assert "Query:\nwhat {PASSAGES}?\n\nDocuments:\n[1]. one t\n\n[2]. three\n\n\n\n## Final" in user
    assert "for all 2 documents. \n" in user


def test_sft_preset_layout():
    user = prompts.build_messages("q\n", ["a", "b"], prompts.load_template("grouprank-sft"))[1]["content"]
    assert "Query:\nq\n\n\nDocuments:\n[1]. a\n\n[2]. b\n\n\n\nProvide your brief" in user
    assert user.endswith("</answer>.\n")


def test_token_budget_shrinks_documents_evenly():
    tok = CharTokenizer()
    docs = ["x" * 500, "y" * 80, "z" * 500]
    full = prompts.render_prompt(tok, "q", docs, prompts.load_template("compact"))
    assert "x" * 500 in full
    budget = len(full) - 300
    cut = prompts.render_prompt(tok, "q", docs, prompts.load_template("compact"), max_prompt_len=budget)
    assert len(tok.encode(cut)) <= budget
    caps = [len(m) for m in re.findall(r"\]\. ([xyz]*)\n", cut)]
    assert caps[0] == caps[2] < 500 and caps[1] == 80  # one common cap; short docs untouched
    one_more = prompts.render_prompt(tok, "q", docs, prompts.load_template("compact"), 3000)
    assert len(one_more) == len(full)
    with pytest.raises(ValueError, match="empty documents"):
        prompts.render_prompt(tok, "q", docs, max_prompt_len=50)


def test_token_budget_with_the_qwen_tokenizer():
    from grouprank_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = [f"Passage {i} about fleas and their life cycle. " * 40 for i in range(5)]
    prompt = prompts.render_prompt(tok, "how long do fleas live", docs, max_prompt_len=900)
    assert prompt.startswith("<|im_start|>system\nYour task is to evaluate")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert 800 < len(tok.encode(prompt, add_special_tokens=False)) <= 900


def test_template_files(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"system": "S", "user": "{TOPK} docs for {QUERY}:\n{PASSAGES}"}))
    (tmp_path / "t.yaml").write_text("system: S\nuser: |\n  {QUERY}\n  {PASSAGES}\n")
    msgs = prompts.build_messages("q", ["d"], prompts.load_template(str(tmp_path / "t.json")))
    assert msgs[1]["content"] == "1 docs for q:\n[1]. d\n\n"
    assert prompts.load_template(str(tmp_path / "t.yaml")).system == "S"
    (tmp_path / "bad.json").write_text(json.dumps({"system": "S", "user": "no docs"}))
    with pytest.raises(ValueError, match="PASSAGES"):
        prompts.load_template(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="neither a preset"):
        prompts.load_template("nope")


def test_format_target():
    target = prompts.format_target([7, 0], " reasons ")
    assert target == '<reason> reasons </reason>\n\n<answer>\n```json\n{\n  "[1]": 7,\n  "[2]": 0\n}\n```\n</answer>'
    with pytest.raises(ValueError, match="0..10"):
        prompts.format_target([11], "r")
