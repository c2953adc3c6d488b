"""Adversarial model output: the tool-call parser, the answer scorers and argument validation
never raise (no ``RecursionError``), give the documented outcome (a format error, ``None``, a
score of 0) and take time linear in the text's length (1 MB inputs: deep brackets, thousands of
unclosed tags, huge valid answers)."""

from __future__ import annotations

import functools
import gc
import json
import random
import re
import time

import pytest

from mtrl_jax.envs.scoring import (
    _json_text,
    dense_reward,
    extract_final_output,
    normalize,
    strict_score,
)
from mtrl_jax.envs.tools import MAX_JSON_DEPTH, Tool, validate_arguments
from mtrl_jax.rollout.parsing import ToolCall, _parse_block, parse_tool_calls

SMALL, BIG = 100_000, 1_000_000  # characters
MAX_SECONDS = 5.0  # generous absolute bound for a 1 MB input
MAX_RATIO = 30  # 10x the text: linear gives ~10x the time, quadratic ~100x
EXPECTED = {"name": "F"}  # what the answers are scored against ("f" after normalisation)
DEEP = f"deeper than {MAX_JSON_DEPTH} levels"


def _best_time(fn, arg, repeats: int):
    """(the best of ``repeats`` times of ``fn(arg)``, its result); the cyclic garbage collector
    is off while timing, so that a full collection of the test process's heap (its cost is the
    heap's size, not the input's) does not land in one measurement only"""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn(arg)
            best = min(best, time.perf_counter() - t0)
    finally:
        gc.enable()
    return best, out


def _assert_linear(fn, small, big, attempts: int = 3):
    """Time ``fn`` on a 100 KB and a 1 MB input: under ``MAX_SECONDS`` and at most
    ``MAX_RATIO`` times the 100 KB time (1 ms at least); returns both results.

    A quadratic cost gives ~100x on every attempt; a noisy machine (CI beside other jobs once
    gave 31x for a case that measures 9-12x alone) rarely spoils several attempts in a row,
    so the ratio is measured up to ``attempts`` times and must hold on one of them."""
    ratios = []
    for _ in range(attempts):
        t_small, out_small = _best_time(fn, small, 3)
        t_big, out_big = _best_time(fn, big, 2)
        assert t_big < MAX_SECONDS, f"{t_big:.2f}s for 1 MB"
        ratios.append((t_small, t_big))
        if t_big < MAX_RATIO * max(t_small, 1e-3):
            return out_small, out_big
    raise AssertionError("not linear: " + "; ".join(
        f"{a * 1e3:.1f} ms for 100 KB, {b * 1e3:.1f} ms for 1 MB" for a, b in ratios))


# ------------------------------------------------------------------------------ inputs

# JSON bodies of ~n characters, put inside <tool_call> or <final_output> tags:
# (make, a well-formed tool call?, an answer whose "name" is "f"?)
JSON_CASES = {
    "deep_lists": (lambda n: "[" * n, False, False),
    "deep_objects": (lambda n: '{"a":' * (n // 5), False, False),
    "deep_closed": (lambda n: '{"name": "f", "arguments": ' + '{"a": ' * (n // 7) + "1"
                    + "}" * (n // 7 + 1), False, False),
    # the outer object is flat (brackets in strings do not count); arguments-as-a-string is deep
    "deep_in_string": (lambda n: '{"name": "f", "arguments": "' + "[" * n + '"}', False, True),
    # an unterminated string of escaped quotes: the bracket pre-check stays linear
    "escaped_quotes": (lambda n: "[" * 100 + '"' + '\\"' * (n // 2), False, False),
    "wide_valid": (lambda n: '{"name": "f", "arguments": {"a": [' + "[1, {}, 3]," * (n // 11)
                   + "1]}}", True, True),
    "huge_valid": (lambda n: json.dumps({"name": "f", "arguments": {"a": "x" * n}}), True, True),
}

# whole turns of ~n characters made of tags
TAG_CASES = {
    "unclosed_tool_call": lambda n: "<tool_call>" * (n // 11),
    "unclosed_final": lambda n: "<final_output>" * (n // 14),
    "alternating_openers": lambda n: "<tool_call><final_output>" * (n // 25),
    "alternating_then_closers": lambda n: "<tool_call><final_output>" * (n // 25)
    + "</tool_call></final_output>",
    "closers_only": lambda n: "</final_output></tool_call>" * (n // 27),
    "many_blocks": lambda n: "<tool_call>{}</tool_call><final_output>[]</final_output>"
    * (n // 56),
}


@functools.cache
def turn(case: str, size: int, tag: str) -> str:
    if case in TAG_CASES:
        return TAG_CASES[case](size)
    return f"<{tag}>{JSON_CASES[case][0](size)}</{tag}>"


# ------------------------------------------------------------------------------ the parser


def _check_parsed(case: str, text: str, p) -> None:
    if case in JSON_CASES:
        ok = JSON_CASES[case][1]
        assert len(p.tool_calls) == int(ok) and len(p.errors) == int(not ok)
        if ok:
            assert p.tool_calls[0].name == "f"
        else:
            assert DEEP in p.errors[0] and len(p.errors[0]) < 400
        return
    assert p.tool_calls == ()
    if case in ("unclosed_tool_call", "alternating_openers"):
        assert len(p.errors) == 1 and p.errors[0].startswith("unclosed <tool_call>")
        assert p.content == ""
    elif case == "alternating_then_closers":  # one block: everything up to the only closer
        assert len(p.errors) == 1 and "not valid JSON" in p.errors[0]
    elif case == "many_blocks":
        assert len(p.errors) == len(text) // 56
        assert all("lacks a string 'name'" in e for e in p.errors)
    else:
        assert p.errors == () and p.content == text


@pytest.mark.parametrize("case", [*JSON_CASES, *TAG_CASES])
def test_parse_tool_calls_is_linear_and_never_raises(case):
    small, big = turn(case, SMALL, "tool_call"), turn(case, BIG, "tool_call")
    for text, parsed in zip((small, big), _assert_linear(parse_tool_calls, small, big),
                            strict=True):
        _check_parsed(case, text, parsed)


# ------------------------------------------------------------------------------ the scorers


@pytest.mark.parametrize("case", [*JSON_CASES, *TAG_CASES])
def test_scorers_are_linear_and_never_raise(case):
    small, big = turn(case, SMALL, "final_output"), turn(case, BIG, "final_output")
    ok = case in JSON_CASES and JSON_CASES[case][2]
    for answer in _assert_linear(extract_final_output, small, big):
        assert (answer["name"] == "f") if ok else answer is None
    t0 = time.perf_counter()
    assert strict_score(big, EXPECTED) == float(ok)
    reward, metrics = dense_reward(big, EXPECTED)
    assert reward == pytest.approx(float(ok)) and metrics["format_ok"] == float(ok)
    assert time.perf_counter() - t0 < 2 * MAX_SECONDS


def test_the_old_quadratic_case_is_fast():
    """20,000 unclosed tags took tens of seconds with the lazy regex ``(.*?)``."""
    for tag in ("<tool_call>", "<final_output>"):
        text = tag * 20_000
        t0 = time.perf_counter()
        p = parse_tool_calls(text)
        assert strict_score(text, EXPECTED) == 0.0 and dense_reward(text, EXPECTED)[0] == 0.0
        assert extract_final_output(text) is None
        assert time.perf_counter() - t0 < 0.5
        assert p.tool_calls == () and len(p.errors) == (tag == "<tool_call>")


def test_nesting_just_under_the_old_recursion_limit_scores_zero():
    """A ~990-deep answer parsed with ``json.loads`` but overflowed ``json.dumps`` later."""
    for depth in range(850, 1000):
        text = '<final_output>{"name": ' + "[" * depth + "]" * depth + "}</final_output>"
        assert strict_score(text, EXPECTED) == 0.0
        assert dense_reward(text, EXPECTED)[0] == 0.0
        call = '<tool_call>{"name": "f", "arguments": {"a": ' + "[" * depth + "]" * depth + "}}"
        assert DEEP in parse_tool_calls(call + "</tool_call>").errors[0]


def test_the_depth_bound_is_exact_and_brackets_in_strings_do_not_count():
    d = MAX_JSON_DEPTH
    # a tool call: object (1) > arguments (2) > lists
    ok = '{"name": "f", "arguments": {"a": ' + "[" * (d - 2) + "]" * (d - 2) + "}}"
    deep = '{"name": "f", "arguments": {"a": ' + "[" * (d - 1) + "]" * (d - 1) + "}}"
    assert isinstance(_parse_block(ok), ToolCall)
    assert DEEP in _parse_block(deep)
    # arguments given as a JSON string are bounded on their own: object (1) > lists
    args_ok = '{"a": ' + "[" * (d - 1) + "]" * (d - 1) + "}"
    args_deep = '{"a": ' + "[" * d + "]" * d + "}"
    assert isinstance(_parse_block(json.dumps({"name": "f", "arguments": args_ok})), ToolCall)
    assert DEEP in _parse_block(json.dumps({"name": "f", "arguments": args_deep}))
    # an answer: object (1) > lists
    ok = '{"name": "f", "a": ' + "[" * (d - 1) + "]" * (d - 1) + "}"
    deep = '{"name": "f", "a": ' + "[" * d + "]" * d + "}"
    assert strict_score(f"<final_output>{ok}</final_output>", EXPECTED) == 1.0
    assert strict_score(f"<final_output>{deep}</final_output>", EXPECTED) == 0.0
    brackets = "[{" * 5000 + '\\"]}'
    text = f'<final_output>{{"name": "f", "s": "{brackets}"}}</final_output>'
    assert extract_final_output(text)["s"] == "[{" * 5000 + '"]}'
    assert strict_score(text, EXPECTED) == 1.0
    call = parse_tool_calls(f'<tool_call>{{"name": "f", "arguments": {{"s": "{brackets}"}}}}'
                            "</tool_call>")
    assert call.errors == () and call.tool_calls[0].arguments["s"].startswith("[{[{")


def test_the_linear_scans_match_the_old_regex_semantics():
    """Same blocks as ``<tag>(.*?)</tag>`` (DOTALL): the last one for the answer, every one
    (plus the unclosed-tag error) for the tool calls."""
    final = re.compile(r"<final_output>(.*?)</final_output>", re.DOTALL)
    block = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def old_parse(text):
        calls, errors, parts, pos = [], [], [], 0
        for m in block.finditer(text):
            parts.append(text[pos:m.start()])
            pos = m.end()
            parsed = _parse_block(m.group(1))
            (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
        rest = text[pos:]
        if "<tool_call>" in rest:
            errors.append(f"unclosed <tool_call>: {rest[rest.index('<tool_call>'):][:200]!r}")
            rest = rest[:rest.index("<tool_call>")]
        parts.append(rest)
        return "".join(parts).strip(), tuple(calls), tuple(errors)

    pieces = ["<tool_call>", "</tool_call>", "<final_output>", "</final_output>", "{", "}",
              '"name": "f"', '{"name": "f"}', '{"a": 1}', ":", ",", "[", "]", "x", "<", "</",
              '"', "\\", " ", "\n"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        blocks = final.findall(text)
        if blocks:
            try:
                want = json.loads(blocks[-1].strip())
            except ValueError:
                want = None
            want = want if isinstance(want, dict) else None
        else:
            want = None
        assert extract_final_output(text) == want, text
        p = parse_tool_calls(text)
        assert (p.content, p.tool_calls, p.errors) == old_parse(text), text


# ------------------------------------------------------------------------------ normalisation


def test_normalize_of_a_deep_value_does_not_recurse():
    deep: list = []
    for _ in range(20_000):
        deep = [deep, {"k": 1}]
    text = normalize(deep)
    assert text.startswith("[[[[") and text.endswith(', {"k": 1}]')


@pytest.mark.parametrize("value", [
    {"b": [1, 2.5, None, True, "Ünï\ncode"], "a": {"z": [], "y": {}}},
    [float("nan"), float("inf"), -float("inf"), 10**30, -0.0, 1e-7, ""],
    {1: "int key", 2.5: "float key", 0: "c"},
    {None: "null key"},
    {True: "bool key", False: "other"},
    ((1, 2), [(3,)]),
    "plain",
])
def test_the_iterative_encoder_writes_what_json_dumps_writes(value):
    nested = value
    for i in range(300):  # deeper than MAX_JSON_DEPTH, shallow enough for json.dumps
        nested = {f"k{i % 3}": nested, "z": [i]} if i % 2 else [nested, i]
    for v in (value, nested):
        assert _json_text(v) == json.dumps(v, sort_keys=True, ensure_ascii=False)
    assert normalize(nested) == " ".join(
        json.dumps(nested, sort_keys=True, ensure_ascii=False).split()).lower()


def test_the_iterative_encoder_refuses_what_json_dumps_refuses():
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="Circular"):
        _json_text(cyclic)
    with pytest.raises(ValueError, match="Circular"):
        normalize(cyclic)
    for bad in ([{1, 2}], {(1,): 2}, {1: "a", "b": 2}):
        with pytest.raises(TypeError):
            json.dumps(bad, sort_keys=True)
        with pytest.raises(TypeError):
            _json_text(bad)


# ------------------------------------------------------------------------------ validation


def _nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_validate_arguments_on_deep_values_never_recurses():
    tree: dict = {"type": "array"}
    tree["items"] = tree  # a recursive schema follows the value as deep as it goes
    tool_ = Tool("t", "", {"type": "object", "properties": {
        "tree": tree, "s": {"type": "string"}, "e": {"enum": ["a", "b"]},
        "u": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}})
    deep = _nested_list(100_000)
    assert validate_arguments(tool_, {"tree": _nested_list(MAX_JSON_DEPTH - 1)}) == []
    errors = validate_arguments(tool_, {"tree": deep})
    assert errors == ["tree" + "[0]" * MAX_JSON_DEPTH + f": nested deeper than {MAX_JSON_DEPTH}"
                      " levels"]
    for key in ("s", "e", "u"):
        (error,) = validate_arguments(tool_, {key: deep})
        assert error.startswith(f"{key}: ") and f"<list nested {DEEP}>" in error
    (error,) = validate_arguments(tool_, {"e": "x" * BIG})  # a 1 MB value: a short message
    assert error.startswith("e: 'xxx") and len(error) < 300
    assert validate_arguments(tool_, deep) == ["arguments must be a JSON object, got list"]


def test_validate_arguments_is_linear():
    tool_ = Tool("t", "", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["tags"],
        "additionalProperties": False})

    def valid(n):  # ~n characters of JSON
        return {"tags": ["abcd"] * (n // 8)}

    def invalid(n):  # an error for every other item, and unknown keys
        return {"tags": ["x" * 40, 7] * (n // 50)} | {f"k{i}": 0 for i in range(n // 500)}

    validate = functools.partial(validate_arguments, tool_)
    assert _assert_linear(validate, valid(SMALL), valid(BIG)) == ([], [])
    _, errors = _assert_linear(validate, invalid(SMALL), invalid(BIG))
    assert len(errors) == BIG // 50 + BIG // 500
    assert errors[0] == "unknown argument 'k0' (valid: ['tags'])"
    assert errors[-1] == f"tags[{2 * (BIG // 50) - 1}]: expected string, got int 7"


def test_a_parsed_huge_tool_call_validates():
    tool_ = Tool("f", "", {"type": "object", "properties": {"a": {"type": "string"}}})
    (call,) = parse_tool_calls(turn("huge_valid", BIG, "tool_call")).tool_calls
    assert validate_arguments(tool_, call.arguments) == []
    (call,) = parse_tool_calls(turn("wide_valid", SMALL, "tool_call")).tool_calls
    (error,) = validate_arguments(tool_, call.arguments)
    assert error.startswith("a: expected string, got list [[1, {}, 3], [1, {}, 3]")
    assert len(error) <= 200
