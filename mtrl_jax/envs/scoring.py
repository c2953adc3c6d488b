"""Scorers: the strict external evaluation, a dense training reward, and the reward audit.

- :func:`strict_score` is what we *believe*: 1 iff every expected field equals the field of the
  JSON object inside the **last** ``<final_output>...</final_output>`` of the answer, after
  case and whitespace normalisation only (no substring matching, no numeric tolerance).
- :func:`dense_reward` is what we may *train on*: per-field accuracy plus a small format term;
  correctness dominates (a perfect format with no right field scores at most
  ``format_weight``).
- :func:`reward_audit` scores the same answers with a reward and with the strict scorer and
  lists where they disagree -- a reward more lenient than the evaluation gets hacked.

All of them are safe against adversarial answers: time linear in the answer's length (unclosed
tags included), and no recursion limit reachable (an answer nested deeper than
:data:`~mtrl_jax.envs.tools.MAX_JSON_DEPTH` brackets is unparseable, so scores 0).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from json.encoder import encode_basestring
from typing import Any

from mtrl_jax.envs.tools import MAX_JSON_DEPTH, json_text_too_deep, nesting_exceeds

FINAL_OPEN = "<final_output>"
FINAL_CLOSE = "</final_output>"


def _last_final_block(text: str) -> str | None:
    """The body of the last ``<final_output>...</final_output>`` block: what the last match of
    the lazy regex ``<final_output>(.*?)</final_output>`` (DOTALL) holds, found by a linear scan
    (each opener, then the first closer after it; an opener without a closer means that no
    closer follows, so the scan stops) instead of the regex's rescans for unclosed openers."""
    last, pos = None, 0
    while (start := text.find(FINAL_OPEN, pos)) >= 0:
        body_start = start + len(FINAL_OPEN)
        end = text.find(FINAL_CLOSE, body_start)
        if end < 0:
            break
        last, pos = (body_start, end), end + len(FINAL_CLOSE)
    return None if last is None else text[last[0]:last[1]]


def extract_final_output(text: str | None) -> dict[str, Any] | None:
    """The JSON object inside the last ``<final_output>`` block, or ``None`` (also for JSON
    nested deeper than ``MAX_JSON_DEPTH``)."""
    if not text:
        return None
    block = _last_final_block(text)
    if block is None:
        return None
    body = block.strip()
    if body.startswith("```"):  # tolerate a fenced block inside the tags
        body = body.strip("`").removeprefix("json").strip()
    if json_text_too_deep(body):  # refused before json.loads: no recursion limit is reachable
        return None
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def normalize(value: Any) -> str:
    """Case and whitespace normalisation only. JSON scalars compare by their text form
    (``true``/``"True"`` and ``7``/``"7"`` agree; ``7.0`` and ``"7"`` do not)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, dict | list):
        if nesting_exceeds(value, MAX_JSON_DEPTH):  # never from a parsed answer; no recursion
            text = _json_text(value)
        else:
            text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    else:
        text = str(value)
    return " ".join(text.split()).lower()


def _json_float(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    return float.__repr__(x)


def _json_scalar(value: Any) -> str:
    """What ``json.dumps(value, ensure_ascii=False)`` writes for a non-container."""
    if isinstance(value, str):
        return encode_basestring(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return _json_float(value)
    return json.dumps(value, ensure_ascii=False)  # raises TypeError, as json.dumps does


def _json_key(key: Any) -> str:
    """A dict key as ``json.dumps`` writes it (str, float, bool/None, int; else TypeError)."""
    if isinstance(key, str):
        return encode_basestring(key)
    if isinstance(key, float):
        return encode_basestring(_json_float(key))
    if key is True or key is False or key is None:
        return encode_basestring(_json_scalar(key))
    if isinstance(key, int):
        return encode_basestring(int.__repr__(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def _json_text(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, ensure_ascii=False)`` without recursion (an explicit
    stack), for values nested too deeply for the C encoder's recursion."""
    parts: list[str] = []
    active: set[int] = set()  # the containers being written: a cycle raises, as in json.dumps
    stack: list[tuple[int, str, Iterator[Any]]] = []  # (id, closer, remaining items)
    item, prefix = value, ""
    while True:  # write ``prefix`` then ``item``, opening a non-empty container
        if isinstance(item, dict | list | tuple) and item:
            ident = id(item)
            if ident in active:
                raise ValueError("Circular reference detected")
            active.add(ident)
            if isinstance(item, dict):
                entries = iter(sorted(item.items(), key=_first))
                stack.append((ident, "}", entries))
                key, item = next(entries)
                parts.append(f"{prefix}{{{_json_key(key)}: ")
            else:
                entries = iter(item)
                stack.append((ident, "]", entries))
                item = next(entries)
                parts.append(prefix + "[")
            prefix = ""
            continue
        if isinstance(item, dict):
            parts.append(prefix + "{}")
        elif isinstance(item, list | tuple):
            parts.append(prefix + "[]")
        else:
            parts.append(prefix + _json_scalar(item))
        while stack:  # the next item: close the finished containers
            ident, closer, entries = stack[-1]
            nxt = next(entries, _DONE)
            if nxt is not _DONE:
                break
            parts.append(closer)
            active.discard(ident)
            stack.pop()
        else:
            return "".join(parts)
        if closer == "}":
            key, item = nxt
            prefix = f", {_json_key(key)}: "
        else:
            item, prefix = nxt, ", "


_DONE = object()


def field_matches(answer: dict[str, Any] | None, expected: dict[str, Any]) -> dict[str, bool]:
    """Per expected field: does the answer hold an equal value (after normalisation)?"""
    answer = answer or {}
    return {k: k in answer and normalize(answer[k]) == normalize(v) for k, v in expected.items()}


def strict_score(text: str | None, expected: dict[str, Any]) -> float:
    """1.0 iff every expected field matches exactly (normalised); else 0.0."""
    if not expected:
        raise ValueError("strict_score needs at least one expected field")
    matches = field_matches(extract_final_output(text), expected)
    return 1.0 if all(matches.values()) else 0.0


def dense_reward(text: str | None, expected: dict[str, Any], *,
                 format_weight: float = 0.1) -> tuple[float, dict[str, float]]:
    """``(1 - w) * field_accuracy + w * format_ok``; returns ``(reward, metrics)``.

    ``format_ok``: a parseable ``<final_output>`` JSON object holding every expected key.
    """
    if not 0 <= format_weight < 0.5:
        raise ValueError("format_weight must be in [0, 0.5) so that correctness dominates")
    answer = extract_final_output(text)
    matches = field_matches(answer, expected)
    acc = sum(matches.values()) / max(len(matches), 1)
    fmt = float(answer is not None and all(k in answer for k in expected))
    reward = (1 - format_weight) * acc + format_weight * fmt
    metrics = {"field_acc": acc, "format_ok": fmt, "strict": float(all(matches.values()))}
    metrics.update({f"field/{k}": float(v) for k, v in matches.items()})
    return reward, metrics


#: the reward kinds of :func:`score_episode`
REWARD_KINDS = ("dense", "strict")


def score_episode(episode, kind: str = "dense") -> None:
    """Report an episode's reward against its task's expected fields: ``dense``
    (:func:`dense_reward`) or ``strict`` (:func:`strict_score`, the evaluation itself)."""
    expected = episode.task.expected or {}
    if kind == "strict":
        score = strict_score(episode.final_text, expected)
        episode.update_reward(score, {"strict": score})
    elif kind == "dense":
        episode.update_reward(*dense_reward(episode.final_text, expected))
    else:
        raise ValueError(f"unknown reward kind {kind!r}; valid: {list(REWARD_KINDS)}")


@dataclasses.dataclass
class AuditReport:
    """Agreement between a reward (thresholded) and the strict scorer on the same answers."""

    n: int
    agreement: float
    lenient: list[int]  # reward says success, strict says failure
    harsh: list[int]  # reward says failure, strict says success
    strict_successes: int

    @property
    def reward_is_safe(self) -> bool:
        """Never calls a reward safe when it credits what the strict scorer rejects."""
        return not self.lenient


def reward_audit(answers: Sequence[str | None], expected: Sequence[dict[str, Any]],
                 reward_fn: Callable[[str | None, dict[str, Any]], float], *,
                 threshold: float = 1.0) -> AuditReport:
    """Score each answer with ``reward_fn`` (success = reward >= threshold) and with
    :func:`strict_score`; list the indices where they disagree."""
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers but {len(expected)} expected outputs")
    lenient, harsh, agree, wins = [], [], 0, 0
    for i, (ans, exp) in enumerate(zip(answers, expected, strict=True)):
        strict = strict_score(ans, exp) == 1.0
        rewarded = reward_fn(ans, exp) >= threshold
        wins += strict
        if strict == rewarded:
            agree += 1
        elif rewarded:
            lenient.append(i)
        else:
            harsh.append(i)
    n = len(answers)
    return AuditReport(n, agree / max(n, 1), lenient, harsh, wins)
