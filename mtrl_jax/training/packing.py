"""Sequence-extension packing: whole episodes as segments of fixed-length rows.

Every sample of a trajectory (usually one per episode: the whole multi-turn conversation as one
token sequence) becomes a *segment*. Segments are placed first-fit-decreasing into rows of length
``L`` -- the smallest of ``row_lengths`` that holds the longest segment -- and the row count is
rounded up to ``multiple * 2^j`` so that a run sees a few ``[rows, L]`` shapes (one compile
each). Positions restart at 0 in each segment; ``segment_ids`` are 1, 2, ... within a row and 0
on padding, which the model's attention mask and the loss kernels both honour.
"""

from __future__ import annotations

import dataclasses
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
    segment_index: np.ndarray  # [R, L] int32: the trajectory index of each token (-1 pad)
    num_tokens: int  # real tokens

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
                           int((self.segment_ids[sl] > 0).sum()))


def choose_row_length(longest: int, row_lengths: Sequence[int]) -> int:
    for length in sorted(row_lengths):
        if longest <= length:
            return length
    raise ValueError(f"an episode of {longest} tokens does not fit the longest packing row "
                     f"({max(row_lengths)}); raise packing.row_lengths or lower "
                     "rollout.max_context_tokens")


def pack(segments: Sequence[Segment], row_lengths: Sequence[int], *,
         multiple: int = 1) -> PackedBatch:
    """Pack ``segments`` (first-fit decreasing) into ``[rows, L]`` arrays; see the module doc."""
    if not segments:
        raise ValueError("nothing to pack")
    length = choose_row_length(max(len(s.tokens) for s in segments), row_lengths)
    order = sorted(range(len(segments)), key=lambda i: -len(segments[i].tokens))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(segments[i].tokens)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(length - n)
    n_rows = max(1, multiple)
    while n_rows < len(rows):
        n_rows *= 2
    shape = (n_rows, length)
    out = PackedBatch(np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                      np.zeros(shape, np.int32), np.zeros(shape, np.float32),
                      np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                      np.full(shape, -1, np.int32), 0)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(sorted(members)):
            s = segments[i]
            n = len(s.tokens)
            sl = slice(at, at + n)
            out.tokens[r, sl] = s.tokens
            out.positions[r, sl] = np.arange(n)
            out.segment_ids[r, sl] = k + 1
            out.loss_mask[r, sl] = s.loss_mask
            out.behaviour_logprobs[r, sl] = np.where(s.loss_mask > 0, s.behaviour_logprobs, 0)
            out.advantages[r, sl] = s.advantage
            out.segment_index[r, sl] = s.index if s.index >= 0 else i
            at += n
    out.num_tokens = int(sum(len(s.tokens) for s in segments))
    return out
