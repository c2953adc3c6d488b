"""Random packed batches for tests: sequences as segments of fixed-length rows."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


def pack(seq_lengths, rows: int, length: int):
    """Greedy first-fit packing of sequences into ``rows`` rows of ``length`` tokens.

    Returns ``segment_ids [rows, L]`` (1.. per row, 0 = padding), ``placement`` -- a list of
    ``(row, start, seq_len)`` per sequence -- and ``segment_sample_index [rows, S]``.
    """
    seg = np.zeros((rows, length), np.int32)
    fill = [0] * rows
    count = [0] * rows
    placement = []
    for n in seq_lengths:
        for r in range(rows):
            if fill[r] + n <= length:
                count[r] += 1
                seg[r, fill[r] : fill[r] + n] = count[r]
                placement.append((r, fill[r], n))
                fill[r] += n
                break
        else:
            raise ValueError("does not fit")
    slots = max(max(count), 1)
    sample_index = -np.ones((rows, slots), np.int32)
    seen = [0] * rows
    for i, (r, _, _) in enumerate(placement):
        sample_index[r, seen[r]] = i
        seen[r] += 1
    return seg, placement, sample_index


def scatter(placement, per_seq_values, rows: int, length: int, fill=0.0, dtype=np.float32):
    """Write a list of 1-D per-sequence arrays into packed ``[rows, L]`` positions."""
    out = np.full((rows, length), fill, dtype)
    for (r, start, n), vals in zip(placement, per_seq_values, strict=True):
        out[r, start : start + n] = vals
    return out


@st.composite
def packed_batches(draw, max_rows: int = 3, max_len: int = 20):
    """A random packed batch with every per-token input a policy loss takes."""
    rows = draw(st.integers(1, max_rows))
    length = draw(st.integers(2, max_len))
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        t, s = 0, 0
        while t < length and draw(st.booleans() if t else st.just(True)):
            n = draw(st.integers(1, length - t))
            s += 1
            seg[r, t : t + n] = s
            t += n
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (rows, length)
    logp = -rng.exponential(1.0, shape).astype(np.float32) - 0.01
    old = (logp + rng.normal(0, 0.3, shape)).astype(np.float32)
    behaviour = (old + rng.normal(0, 0.3, shape)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, shape)).astype(np.float32)
    adv = rng.normal(0, 1, shape).astype(np.float32)
    mask = (rng.random(shape) < 0.8) & (seg > 0)
    return dict(logp=logp, old=old, behaviour=behaviour, ref=ref, adv=adv, mask=mask, seg=seg)
