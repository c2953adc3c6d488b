"""Scorers: the strict external evaluation, a dense training reward, and the reward audit.

- :func:`strict_score` is what we *believe*: 1 iff every expected field equals the field of the
  JSON object inside the **last** ``<final_output>...</final_output>`` of the answer, after
  case and whitespace normalisation only (no substring matching, no numeric tolerance).
- :func:`dense_reward` is what we may *train on*: per-field accuracy plus a small format term;
  correctness dominates (a perfect format with no right field scores at most
  ``format_weight``).
- :func:`reward_audit` scores the same answers with a reward and with the strict scorer and
  lists where they disagree -- a reward more lenient than the evaluation gets hacked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

_FINAL = re.compile(r"<final_output>(.*?)</final_output>", re.DOTALL)


def extract_final_output(text: str | None) -> dict[str, Any] | None:
    """The JSON object inside the last ``<final_output>`` block, or ``None``."""
    if not text:
        return None
    blocks = _FINAL.findall(text)
    if not blocks:
        return None
    body = blocks[-1].strip()
    if body.startswith("```"):  # tolerate a fenced block inside the tags
        body = body.strip("`").removeprefix("json").strip()
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
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    else:
        text = str(value)
    return " ".join(text.split()).lower()


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
