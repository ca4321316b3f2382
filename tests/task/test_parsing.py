"""The output parser: documented rules, the official parser's repairs, and a >= 10k-case fuzz."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grouprank_jax.task.parsing import (
    STATUS_BAD_JSON,
    STATUS_BAD_TAGS,
    STATUS_OK,
    extract_json_text,
    parse_batch,
    parse_group_output,
    tags_ok,
)
from grouprank_jax.task.prompts import format_target

GOOD = '<reason> doc 2 answers it </reason>\n\n<answer> \n```json\n{"[1]": 3, "[2]": 9, "[3]": 0}\n``` \n</answer>'


def test_well_formed_output():
    out = parse_group_output(GOOD, 3)
    assert out.format_status == STATUS_OK and out.json_ok
    np.testing.assert_array_equal(out.scores, [3, 9, 0])
    assert out.valid.all() and out.scores.dtype == np.float32


def test_sft_target_round_trips():
    out = parse_group_output(format_target([7, 10, 0, 4], "because"), 4)
    assert out.format_status == STATUS_OK
    np.testing.assert_array_equal(out.scores, [7, 10, 0, 4])


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<reason>a</reason><answer>b</answer>", True),
        ("  \n<reason>a</reason>\n\n<answer>b</answer>\n", True),
        ("<reason>a</reason> x <answer>b</answer>", False),  # text between the blocks
        ("hi <reason>a</reason><answer>b</answer>", False),  # text before
        ("<reason>a</reason><answer>b</answer> bye", False),  # text after
        ("<reason>a</reason><answer>b", False),  # stop string stripped
        ("<answer>b</answer><reason>a</reason>", False),
        ("<reason>a</reason><answer>b</answer><answer>c</answer>", False),  # tag twice
        ("<reason><reason>a</reason><answer>b</answer>", False),
    ],
)
def test_tag_rule(text, ok):
    assert tags_ok(text) is ok


def test_bad_json_with_good_tags_is_status_1():
    out = parse_group_output("<reason>r</reason><answer>no json here</answer>", 3)
    assert out.format_status == STATUS_BAD_JSON and not out.json_ok and not out.valid.any()


def test_bad_tags_still_yield_scores_for_inference():
    out = parse_group_output('Sure! {"[1]": 4, "[2]": 8}', 2)
    assert out.format_status == STATUS_BAD_TAGS and out.json_ok
    np.testing.assert_array_equal(out.scores, [4, 8])


def test_official_repairs():
    # "[7]]" -> "[7]", missing closing brace, whitespace runs, last ```json block wins.
    text = '<reason>r</reason><answer>```json {"[1]": 1} ``` ```json\n{"[1]]": 5,\n\n "[2]":   6\n```</answer>'
    out = parse_group_output(text, 2)
    assert out.format_status == STATUS_OK
    np.testing.assert_array_equal(out.scores, [5, 6])
    # Without a json fence the last {...} is used.
    assert extract_json_text('a {"[1]": 1} b {"[1]": 2} c') == '{"[1]": 2}'


def test_key_and_value_rules():
    text = (
        '<reason>r</reason><answer>{"[1]": 7.0, "2": 4, " [3] ": 2, "[4]": 7.5, "[5]": 11, '
        '"[6]": -1, "[7]": true, "[8]": "7", "[9]": null, "[0]": 5, "[12]": 5, "doc": 3, '
        '"[10]": 1, "10": 8, "[11": 6, "2]": 9}</answer>'  # unbalanced brackets: ignored
    )
    out = parse_group_output(text, 11)
    assert out.format_status == STATUS_OK
    np.testing.assert_array_equal(out.valid, [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(out.scores, [7, 4, 2, 0, 0, 0, 0, 0, 0, 8, 0])  # last duplicate wins
    assert "keys ignored" in out.reason


def test_json_array_and_non_strings_are_failures():
    assert not parse_group_output("<reason>r</reason><answer>```json [1, 2] ```</answer>", 2).json_ok
    assert parse_group_output(None, 2).format_status == STATUS_BAD_TAGS  # type: ignore[arg-type]
    assert parse_group_output("", 0).scores.shape == (0,)


def test_parse_batch_shapes_and_padding():
    scores, valid, status = parse_batch([GOOD, "garbage", '{"[2]": 5}'], [3, 2, 4], pad_to=5)
    assert scores.shape == (3, 5) and valid.shape == (3, 5) and status.shape == (3,)
    np.testing.assert_array_equal(status, [0, 2, 2])
    np.testing.assert_array_equal(scores[2], [0, 5, 0, 0, 0])
    assert not valid[0, 3:].any() and not valid[1].any() and not valid[2, 4:].any()
    with pytest.raises(ValueError, match="pad_to"):
        parse_batch([GOOD], [6], pad_to=5)


def test_adversarial_inputs_do_not_hang():
    # A hang guard against catastrophic regex backtracking (exponential: it would not finish at
    # all), not a speed claim; these inputs take well under a second.
    import time

    start = time.perf_counter()
    for text in [
        "{" * 50_000,
        "<answer>" * 20_000,
        "```json" * 20_000,
        "[" * 5000 + "]" * 5000,
        '{"[1]": ' + "9" * 5000 + "}",
    ]:
        parse_group_output(text, 20)
    assert time.perf_counter() - start < 60.0


_PIECES = [
    "<reason>",
    "</reason>",
    "<answer>",
    "</answer>",
    "```json",
    "```",
    "{",
    "}",
    "[",
    "]",
    '"',
    ":",
    ",",
    '"[1]"',
    '"[2]"',
    '"[20]"',
    '"[21]"',
    "7",
    "10",
    "-3",
    "7.5",
    "1e3",
    "NaN",
    "Infinity",
    "null",
    "true",
    "\n",
    " ",
    "\t",
    "é",
    "\\",
    "\\u00",
    "[7]]",
    "reasoning text",
]


def _mutate(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        pos = rng.randint(0, len(chars))
        if op < 0.4:
            chars[pos:pos] = list(rng.choice(_PIECES))
        elif op < 0.7 and chars:
            del chars[pos : pos + rng.randint(1, 8)]
        elif chars:
            chars[min(pos, len(chars) - 1)] = chr(rng.randint(0, 0x2FF))
    return "".join(chars)


def _check_shapes(text, size):
    out = parse_group_output(text, size)
    assert out.scores.shape == (size,) and out.scores.dtype == np.float32
    assert out.valid.shape == (size,) and out.valid.dtype == bool
    assert out.format_status in (0, 1, 2) and isinstance(out.reason, str)
    assert np.all((out.scores >= 0) & (out.scores <= 10)) and np.all(out.scores[~out.valid] == 0)
    if out.format_status == STATUS_OK:
        assert tags_ok(text) and out.json_ok


def test_fuzz_mutated_and_random_outputs_never_raise():
    rng = random.Random(1234)
    for case in range(12_000):
        size = rng.randint(1, 20)
        if case % 3 == 0:
            text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 40)))
        else:
            base = format_target([rng.randint(0, 10) for _ in range(size)], "why " * rng.randint(0, 5))
            text = _mutate(base, rng)
        _check_shapes(text, size)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(_PIECES) | st.text(max_size=4), max_size=60).map("".join), st.integers(1, 20))
def test_fuzz_hypothesis(text, size):
    _check_shapes(text, size)
