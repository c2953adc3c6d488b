"""Sequence-extension packing: whole episodes as segments of fixed-length rows.

Every sample of a trajectory (usually one per episode: the whole multi-turn conversation as one
token sequence) becomes a *segment*. Rows have one of ``row_lengths`` (at least the longest
segment); the row count is rounded up to ``multiple * 2^j`` (``round_rows="pow2"``: a run sees a
few ``[rows, L]`` shapes, one compile each) or to the next multiple of ``multiple``
(``"multiple"``: less padding, more shapes). Of the row lengths, the one whose rounded rows
compute the fewest tokens is used (ties: the shorter). ``segment_ids`` are 1, 2, ... within a
row and 0 on padding, which the model's attention mask and the loss kernels both honour.

**Shared prefixes.** The episodes of a group start with the same prompt. With ``min_shared > 0``
segments whose first ``min_shared`` or more tokens are equal form a *tree*: the common prefix
is packed once as its own segment (no loss tokens) and each episode's remaining tokens follow it
in the same row as a child segment whose ``parent_ids`` names the prefix, so its tokens attend
to the prefix and to their own earlier tokens, never to a sibling; positions continue from the
prefix's length. The forward therefore computes what flat packing computes, and the backward
sums each child's contribution to the prefix's activations: loss and gradients equal flat
packing's up to float summation order. The prefix stops one token before each member's first
loss token, so every loss token's predecessor lies in its own segment (a log-prob is taken
within a segment only). One level only: episodes sampled at temperature > 0 part at their first
sampled token, so a deeper tree (common first turns) would rarely share anything; episodes
sharing a whole first turn (greedy groups) share the prompt only. A tree longer than a row is
split into several, each with its own copy of the prefix.

Units (trees and flat segments) are placed best-fit decreasing: each into the row whose free
space it fills most tightly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class Segment:
    tokens: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] 0/1
    behaviour_logprobs: np.ndarray  # [n] f32 (0 where loss_mask is 0)
    advantage: float | np.ndarray  # scalar, or [n] per token
    index: int = -1  # the trajectory it came from


@dataclasses.dataclass
class PackedBatch:
    tokens: np.ndarray  # [R, L] int32
    positions: np.ndarray  # [R, L] int32
    segment_ids: np.ndarray  # [R, L] int32
    loss_mask: np.ndarray  # [R, L] f32
    behaviour_logprobs: np.ndarray  # [R, L] f32
    advantages: np.ndarray  # [R, L] f32
    segment_index: np.ndarray  # [R, L] int32: the trajectory index of each token (-1: padding
    #                            or a shared prefix)
    num_tokens: int  # real tokens (a shared prefix counted once per row it is in)
    parent_ids: np.ndarray | None = None  # [R, L] int32: the prefix segment a token also sees
    flat_tokens: int = -1  # the tokens flat packing would carry (-1: num_tokens)

    def __post_init__(self):
        if self.parent_ids is None:
            self.parent_ids = np.zeros_like(self.segment_ids)
        if self.flat_tokens < 0:
            self.flat_tokens = self.num_tokens

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    @property
    def efficiency(self) -> float:
        return self.num_tokens / max(1, self.tokens.size)

    def rows(self, sl: slice) -> PackedBatch:
        return PackedBatch(self.tokens[sl], self.positions[sl], self.segment_ids[sl],
                           self.loss_mask[sl], self.behaviour_logprobs[sl],
                           self.advantages[sl], self.segment_index[sl],
                           int((self.segment_ids[sl] > 0).sum()), self.parent_ids[sl])


def choose_row_length(longest: int, row_lengths: Sequence[int]) -> int:
    for length in sorted(row_lengths):
        if longest <= length:
            return length
    raise ValueError(f"an episode of {longest} tokens does not fit the longest packing row "
                     f"({max(row_lengths)}); raise packing.row_lengths or lower "
                     "rollout.max_context_tokens")


@dataclasses.dataclass
class _Unit:
    """Segments packed together: ``members`` (indices) after a prefix of ``shared`` tokens of
    the first member (0: a single flat segment)."""

    members: list[int]
    shared: int
    size: int


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def _units(segments: Sequence[Segment], length: int, min_shared: int) -> list[_Unit]:
    """Trees of segments with a common prefix of at least ``min_shared`` tokens, and flat
    segments; see the module docstring."""
    n = len(segments)
    lens = [len(s.tokens) for s in segments]
    if min_shared <= 0 or n < 2:
        return [_Unit([i], 0, lens[i]) for i in range(n)]
    # the longest prefix a member may share: up to the token before its first loss token
    caps = []
    for s in segments:
        hits = np.nonzero(np.asarray(s.loss_mask) > 0)[0]
        caps.append(int(hits[0]) - 1 if len(hits) else len(s.tokens) - 1)
    # byte order of little-endian int32 keeps segments with a common token prefix adjacent
    order = sorted(range(n), key=lambda i: np.asarray(segments[i].tokens, "<i4").tobytes())
    clusters: list[tuple[list[int], int]] = []
    members, shared = [order[0]], 0
    for prev, i in itertools.pairwise(order):
        common = min(_common_prefix(np.asarray(segments[prev].tokens),
                                    np.asarray(segments[i].tokens)), caps[prev], caps[i])
        if len(members) == 1 and common >= min_shared:
            shared = common  # a tree starts: its prefix is this pair's
            members.append(i)
        elif len(members) > 1 and common >= shared:
            members.append(i)  # joins without shortening the prefix
        else:
            clusters.append((members, shared if len(members) > 1 else 0))
            members, shared = [i], 0
    clusters.append((members, shared if len(members) > 1 else 0))
    units = []
    for members, shared in clusters:
        if not shared:
            units.extend(_Unit([i], 0, lens[i]) for i in members)
            continue
        # one tree per row at most: split the children where the row would overflow
        chunk: list[int] = []
        size = shared
        for i in sorted(members):
            if chunk and size + lens[i] - shared > length:
                units.append(_Unit(chunk, shared, size) if len(chunk) > 1
                             else _Unit(chunk, 0, lens[chunk[0]]))
                chunk, size = [], shared
            chunk.append(i)
            size += lens[i] - shared
        units.append(_Unit(chunk, shared, size) if len(chunk) > 1
                     else _Unit(chunk, 0, lens[chunk[0]]))
    return units


def pack(segments: Sequence[Segment], row_lengths: Sequence[int], *,
         multiple: int = 1, min_shared: int = 0, round_rows: str = "pow2") -> PackedBatch:
    """Pack ``segments`` into ``[rows, L]`` arrays (best-fit decreasing; with ``min_shared > 0``
    common prefixes of at least that many tokens are packed once per row); see the module
    docstring."""
    if not segments:
        raise ValueError("nothing to pack")
    shortest = choose_row_length(max(len(s.tokens) for s in segments), row_lengths)
    best = None
    for length in sorted(x for x in set(row_lengths) if x >= shortest):
        units = _units(segments, length, min_shared)
        rows = _place(units, length)
        n_rows = _round_rows(len(rows), multiple, round_rows)
        # the row length whose rounded rows compute the fewest tokens (ties: the shorter rows,
        # whose attention costs less)
        if best is None or n_rows * length < best[0] * best[1]:
            best = (n_rows, length, units, rows)
    n_rows, length, units, rows = best
    return _fill(segments, units, rows, n_rows, length)


def _round_rows(used: int, multiple: int, round_rows: str) -> int:
    n_rows = max(1, multiple)
    if round_rows == "multiple":
        return n_rows * max(1, -(-used // n_rows))
    if round_rows == "pow2":
        while n_rows < used:
            n_rows *= 2
        return n_rows
    raise ValueError(f"round_rows must be 'pow2' or 'multiple', got {round_rows!r}")


def _place(units: list[_Unit], length: int) -> list[list[int]]:
    """Best-fit decreasing: each unit, longest first, into the row it fills most tightly."""
    order = sorted(range(len(units)), key=lambda u: (-units[u].size, units[u].members[0]))
    rows: list[list[int]] = []
    free: list[int] = []
    for u in order:
        size = units[u].size
        fits = [r for r in range(len(rows)) if free[r] >= size]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))  # the tightest fit
            rows[r].append(u)
            free[r] -= size
        else:
            rows.append([u])
            free.append(length - size)
    return rows


def _fill(segments: Sequence[Segment], units: list[_Unit], rows: list[list[int]], n_rows: int,
          length: int) -> PackedBatch:
    shape = (n_rows, length)
    out = PackedBatch(np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                      np.zeros(shape, np.int32), np.zeros(shape, np.float32),
                      np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                      np.full(shape, -1, np.int32), 0, np.zeros(shape, np.int32),
                      int(sum(len(s.tokens) for s in segments)))
    num = 0
    for r, placed in enumerate(rows):
        at, seg_id = 0, 0
        for u in sorted(placed, key=lambda u: units[u].members[0]):
            unit = units[u]
            parent, skip = 0, unit.shared
            if skip:
                seg_id += 1
                parent = seg_id
                sl = slice(at, at + skip)
                out.tokens[r, sl] = segments[unit.members[0]].tokens[:skip]
                out.positions[r, sl] = np.arange(skip)
                out.segment_ids[r, sl] = seg_id
                at += skip
            for i in sorted(unit.members):
                s = segments[i]
                n = len(s.tokens) - skip
                sl = slice(at, at + n)
                seg_id += 1
                out.tokens[r, sl] = s.tokens[skip:]
                out.positions[r, sl] = np.arange(skip, skip + n)
                out.segment_ids[r, sl] = seg_id
                out.parent_ids[r, sl] = parent
                out.loss_mask[r, sl] = s.loss_mask[skip:]
                out.behaviour_logprobs[r, sl] = np.where(s.loss_mask[skip:] > 0,
                                                         s.behaviour_logprobs[skip:], 0)
                adv = s.advantage
                out.advantages[r, sl] = adv[skip:] if np.ndim(adv) else adv
                out.segment_index[r, sl] = s.index if s.index >= 0 else i
                at += n
        num += at
    out.num_tokens = num
    return out
