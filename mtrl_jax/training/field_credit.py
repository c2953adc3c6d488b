"""Per-field credit: the tokens that spell each answer field carry that field's own advantage.

A dense reward averages per-field correctness (``field/<name>`` in an episode's reward
metrics, 0 or 1). With one advantage per episode every token of the answer shares it, so the
token that decides one field is pushed up or down by how the *other* fields went: in a group
whose episodes all got ``serial`` wrong, an episode that also got ``electrical`` right lifts
its wrong ``serial`` token. With ``algorithm.field_credit: true`` the tokens of each field's
value in the final ``<final_output>`` JSON object get that field's group advantage instead
(the recipe's ``group_based`` normalisation over the group's 0/1 scores of the field), and
every other token (tool calls, keys, format) keeps the episode's advantage.

Host-side numpy, applied to the segments that :func:`~mtrl_jax.training.batch.episode_segments`
made, before packing:

- :func:`value_spans` -- where each top-level value of the last ``<final_output>`` object
  lies in a text (character offsets; a block that does not parse as a flat object gives none);
- :func:`token_ends` -- the character offset at which each token's text ends in the decoding
  of a token list (prefix decodes, so multi-token characters and tokenizer glue stay exact);
- :func:`field_advantages` -- ``[G, n, F]`` group advantages of the fields' 0/1 scores;
- :func:`apply_field_credit` -- the per-token advantages of each episode's final answer.

An episode whose answer has no parseable block (or lacks a field) keeps the episode advantage
on those tokens; its scores still count in its group's baselines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from mtrl_jax.envs.scoring import FINAL_CLOSE, FINAL_OPEN
from mtrl_jax.kernels import compute_advantages
from mtrl_jax.kernels.advantages import GroupBasedParams
from mtrl_jax.rollout.trajectory import Trajectory
from mtrl_jax.training.packing import Segment

#: reward-metric prefix of a field's 0/1 score (what ``dense_reward`` reports)
FIELD_PREFIX = "field/"

_WS = " \t\r\n"
_DECODER = json.JSONDecoder()
_GRPO = GroupBasedParams()


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_spans(text: str | None) -> dict[str, tuple[int, int]]:
    """``{key: (start, end)}``: the characters of each top-level value of the JSON object in
    the last ``<final_output>...</final_output>`` block of ``text`` (a string value without
    its quotes). A key given twice: its last value (what ``json.loads`` keeps). ``{}`` when
    there is no closed block or its body is not a JSON object."""
    if not text:
        return {}
    last, pos = None, 0
    while (start := text.find(FINAL_OPEN, pos)) >= 0:  # the scorer's block: last opener
        body = start + len(FINAL_OPEN)                    # with a closer after it
        end = text.find(FINAL_CLOSE, body)
        if end < 0:
            break
        last, pos = (body, end), end + len(FINAL_CLOSE)
    if last is None:
        return {}
    lo, hi = last
    i = text.find("{", lo, hi)
    if i < 0 or text[lo:i].strip().strip("`").removeprefix("json").strip():
        return {}  # something other than a (fenced) object before the brace
    block = text[:hi]
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_ws(block, i + 1)
    try:
        if i < hi and block[i] == "}":
            return {}
        while i < hi:
            if block[i] != '"':
                return {}
            key, i = _DECODER.raw_decode(block, i)
            i = _skip_ws(block, i)
            if i >= hi or block[i] != ":":
                return {}
            v0 = _skip_ws(block, i + 1)
            value, v1 = _DECODER.raw_decode(block, v0)
            spans[key] = (v0 + 1, v1 - 1) if isinstance(value, str) else (v0, v1)
            i = _skip_ws(block, v1)
            if i < hi and block[i] == ",":
                i = _skip_ws(block, i + 1)
            elif i < hi and block[i] == "}":
                return spans
            else:
                return {}
    except (json.JSONDecodeError, ValueError, RecursionError):
        return {}
    return {}  # no closing brace inside the block


def token_ends(decode: Callable[[list[int]], str], ids: Sequence[int]) -> np.ndarray:
    """``[len(ids)]``: where each token's text ends in ``decode(ids)``, from the decodings of
    the prefixes (non-decreasing: a prefix that decodes shorter than the one before, e.g. half
    a multi-byte character, ends where the previous token ended)."""
    ends = np.zeros(len(ids), np.int64)
    prev = 0
    for j in range(len(ids)):
        prev = max(prev, len(decode(list(ids[:j + 1]))))
        ends[j] = prev
    return ends


def field_names(trajs: Sequence[Trajectory]) -> list[str]:
    """The fields any episode of the step reports (``field/<name>`` reward metrics), sorted."""
    names = {k[len(FIELD_PREFIX):] for t in trajs for k in t.reward_metrics
             if k.startswith(FIELD_PREFIX)}
    return sorted(names)


def field_advantages(trajs: Sequence[Trajectory], valid: np.ndarray, fields: Sequence[str],
                     params: GroupBasedParams = _GRPO) -> np.ndarray:
    """``[G, n, F]``: per field, the ``group_based`` advantage of the episodes' 0/1 scores
    (a field an episode does not report scores 0). ``valid``: ``[G, n]``."""
    g, n = valid.shape
    scores = np.array([[float(t.reward_metrics.get(FIELD_PREFIX + f, 0.0)) for f in fields]
                       for t in trajs], np.float32).reshape(g, n, len(fields))
    out = [np.asarray(compute_advantages("group_based", jnp.asarray(scores[..., k]),
                                         jnp.asarray(valid), params=params))
           for k in range(len(fields))]
    return np.stack(out, -1).astype(np.float32) if out else np.zeros((g, n, 0), np.float32)


def _final_turn(traj: Trajectory) -> tuple[int, np.ndarray] | None:
    """``(sample index, positions)`` of the sampled tokens of the episode's last sampled turn."""
    for si in range(len(traj.samples) - 1, -1, -1):
        arr = traj.samples[si].arrays()
        sampled = np.flatnonzero(arr["loss_mask"] > 0)
        if sampled.size:
            turn = arr["turn_index"][sampled[-1]]
            return si, sampled[arr["turn_index"][sampled] == turn]
    return None


def apply_field_credit(segments: list[Segment], trajs: Sequence[Trajectory], valid: np.ndarray,
                       decode: Callable[[list[int]], str],
                       params: GroupBasedParams = _GRPO,
                       ) -> tuple[list[Segment], dict[str, float]]:
    """Give the tokens of each field's value in an episode's final answer that field's group
    advantage (see the module docstring). ``segments``: from ``episode_segments`` (each holding
    its trajectory's index); the segment of the sample that holds the final turn gets a
    per-token advantage array. Returns the new segments and metrics: ``train/field_credit/
    episodes`` (the share of valid episodes whose answer gave at least one field span) and
    ``train/field_credit/tokens`` (the tokens that carry a field's advantage)."""
    fields = field_names(trajs)
    if not fields:
        return list(segments), {"train/field_credit/episodes": 0.0,
                                "train/field_credit/tokens": 0.0}
    fadv = field_advantages(trajs, valid, fields, params).reshape(len(trajs), len(fields))
    flat_valid = valid.reshape(-1)
    # a trajectory's samples appear in order; the final turn's sample is one of them
    by_traj: dict[int, list[int]] = {}
    for k, seg in enumerate(segments):
        by_traj.setdefault(seg.index, []).append(k)
    out = list(segments)
    credited, n_tokens = 0, 0
    for i, traj in enumerate(trajs):
        if not flat_valid[i] or i not in by_traj:
            continue
        found = _final_turn(traj)
        if found is None:
            continue
        si, pos = found
        sample_tokens = np.asarray(traj.samples[si].tokens, np.int32)
        seg_k = next((k for k in by_traj[i] if len(out[k].tokens) == len(sample_tokens)
                      and np.array_equal(out[k].tokens, sample_tokens)), None)
        if seg_k is None:
            continue
        ids = sample_tokens[pos].tolist()
        spans = value_spans(decode(ids))
        hits = [(fields.index(f), s) for f, s in spans.items() if f in fields and s[1] > s[0]]
        if not hits:
            continue
        ends = token_ends(decode, ids)
        starts = np.concatenate([[0], ends[:-1]])
        # a token that adds no character (a UTF-8 continuation byte) completes the one before
        starts = np.where(starts == ends, np.maximum(starts - 1, 0), starts)
        seg = out[seg_k]
        adv = (np.asarray(seg.advantage, np.float32) if np.ndim(seg.advantage)
               else np.float32(seg.advantage) * (seg.loss_mask > 0).astype(np.float32))
        adv = adv.copy()
        for fk, (a, b) in hits:
            over = (starts < b) & (ends > a)  # the tokens whose text overlaps the value
            adv[pos[over]] = fadv[i, fk]
            n_tokens += int(over.sum())
        credited += 1
        out[seg_k] = Segment(seg.tokens, seg.loss_mask, seg.behaviour_logprobs, adv,
                             index=seg.index)
    n_valid = max(int(flat_valid.sum()), 1)
    return out, {"train/field_credit/episodes": credited / n_valid,
                 "train/field_credit/tokens": float(n_tokens)}
