"""Segment-aware reductions over packed rows (sequence extension).

A packed batch holds whole episodes as *segments* of fixed-length rows:

- ``segment_ids: [rows, L] int`` -- ``0`` marks padding, ``1..S`` the segments of a row. Ids are
  row-local and must lie in ``[0, L]`` (a row of ``L`` tokens holds at most ``L`` segments); they
  need not be contiguous or sorted.
- ``segment_sample_index: [rows, S] int`` -- for segment id ``s`` of row ``r``, the index of the
  trajectory (sample) it holds in the flat list of samples, at ``[r, s - 1]``; ``-1`` for unused.
- ``turn_index: [rows, L] int`` -- the turn of each token within its episode (for per-turn values).

Every reduction here is a scatter-add over ``row * (L + 1) + segment_id``: one pass over the
tokens, no Python loop over segments, and the same cost for any segmentation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtrl_jax.kernels import _validate as v


def _flat_ids(segment_ids: jax.Array) -> tuple[jax.Array, int]:
    rows, length = segment_ids.shape
    ids = jnp.clip(segment_ids.astype(jnp.int32), 0, length)
    flat = jnp.arange(rows, dtype=jnp.int32)[:, None] * (length + 1) + ids
    return flat, rows * (length + 1)


def segment_sum(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Sum of ``x: [rows, L]`` per (row, segment). Returns ``[rows, L + 1]``.

    Column ``s`` of row ``r`` is the sum over tokens of segment ``s`` in row ``r``; column 0
    collects padding.
    """
    flat, n = _flat_ids(segment_ids)
    sums = jax.ops.segment_sum(x.reshape(-1), flat.reshape(-1), num_segments=n)
    return sums.reshape(segment_ids.shape[0], segment_ids.shape[1] + 1)


def gather_segments(per_segment: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Inverse of :func:`segment_sum`'s layout: ``[rows, L + 1] -> [rows, L]`` per token."""
    ids = jnp.clip(segment_ids.astype(jnp.int32), 0, segment_ids.shape[1])
    return jnp.take_along_axis(per_segment, ids, axis=1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` where ``mask``; 0 when the mask is empty."""
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max of ``x`` where ``mask``; 0 when the mask is empty."""
    out = jnp.max(jnp.where(mask, x, -jnp.inf))
    return jnp.where(jnp.any(mask), out, 0.0)


def masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Min of ``x`` where ``mask``; 0 when the mask is empty."""
    out = jnp.min(jnp.where(mask, x, jnp.inf))
    return jnp.where(jnp.any(mask), out, 0.0)


def broadcast_to_tokens(
    values: jax.Array,
    segment_ids: jax.Array,
    segment_sample_index: jax.Array,
    turn_index: jax.Array | None = None,
) -> jax.Array:
    """Spread per-sample or per-turn values (e.g. advantages) onto the tokens of packed rows.

    Args:
      values: ``[N]`` one value per sample (sequence-level advantages, flattened from
        ``[num_groups, group_size]`` row-major), or ``[N, T]`` one value per turn.
      segment_ids: ``[rows, L] int``, 0 = padding.
      segment_sample_index: ``[rows, S] int``: sample index of segment ``s`` at ``[r, s-1]``.
      turn_index: ``[rows, L] int``, required iff ``values`` is ``[N, T]``. Tokens whose turn is
        outside ``[0, T)`` get 0.

    Returns:
      ``[rows, L] f32``: the value of each token's sample (and turn); exactly 0 on padding.
    """
    where = "broadcast_to_tokens"
    v.check_rank(where, "values", values, (1, 2))
    v.check_rank(where, "segment_ids", segment_ids, 2)
    v.check_rank(where, "segment_sample_index", segment_sample_index, 2)
    v.check_integer(where, segment_ids=segment_ids, segment_sample_index=segment_sample_index)
    if segment_sample_index.shape[0] != segment_ids.shape[0]:
        raise ValueError(
            f"{where}: 'segment_sample_index' has shape {segment_sample_index.shape} but "
            f"'segment_ids' has shape {segment_ids.shape}: both need one row per packed row"
        )
    per_turn = values.ndim == 2
    if per_turn:
        if turn_index is None:
            raise ValueError(
                f"{where}: 'values' has shape {values.shape} (per turn) so 'turn_index' "
                "[rows, L] is required"
            )
        v.check_same_shape(where, "segment_ids", segment_ids, turn_index=turn_index)
        v.check_integer(where, turn_index=turn_index)

    num_slots = segment_sample_index.shape[1]
    slot = jnp.clip(segment_ids.astype(jnp.int32) - 1, 0, num_slots - 1)
    sample = jnp.take_along_axis(segment_sample_index.astype(jnp.int32), slot, axis=1)
    valid = (segment_ids > 0) & (segment_ids <= num_slots) & (sample >= 0)
    valid &= sample < values.shape[0]
    sample = jnp.clip(sample, 0, values.shape[0] - 1)
    if per_turn:
        turns = turn_index.astype(jnp.int32)
        valid &= (turns >= 0) & (turns < values.shape[1])
        out = values[sample, jnp.clip(turns, 0, values.shape[1] - 1)]
    else:
        out = values[sample]
    return jnp.where(valid, out.astype(jnp.float32), 0.0)
