"""From a step's trajectories to packed training rows: rewards -> advantages -> segments -> rows.

Pure host-side functions (numpy in, numpy out), each tested on literal tokens:

- :func:`advantage_inputs` -- what an estimator may read, from task-major trajectories
  (``group_size`` episodes per task): sequence rewards ``[G, n]``, per-turn rewards
  ``[G, n, T]`` (an environment's ``update_reward([...])``; a scalar reward is a reward at the
  last turn), the number of sampled tokens ``[G, n]``, and which episodes / turns are valid (an
  episode that ended in an error is left out of every baseline and gets no gradient).
- :func:`compute_step_advantages` -- the recipe's estimator with the recipe's parameters.
- :func:`episode_segments` -- each sample of a valid episode as one segment, its tokens carrying
  the episode's advantage (or, for a per-turn estimator, the advantage of the turn they belong
  to).
- :func:`pack_for_update` / :func:`minibatch_rows` -- rows whose count splits evenly into the
  recipe's mini-batches, real rows spread over them so that every real row is trained on exactly
  once per epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from mtrl_jax.kernels import ADVANTAGE_ESTIMATORS, compute_advantages
from mtrl_jax.rollout.trajectory import Trajectory
from mtrl_jax.training.packing import PackedBatch, Segment, pack

#: the inputs the trainer feeds an advantage estimator (see ``AdvantageEstimator.inputs``);
#: a recipe naming an estimator that needs anything else fails when it loads
ADVANTAGE_INPUTS = frozenset({"rewards", "lengths", "turn_rewards"})


@dataclasses.dataclass
class AdvantageInputs:
    """Arrays of one step, task-major (``G`` tasks x ``n`` episodes, ``T`` turns)."""

    rewards: np.ndarray       # [G, n] f32
    valid: np.ndarray         # [G, n] bool
    lengths: np.ndarray       # [G, n] f32: sampled tokens per episode
    turn_rewards: np.ndarray  # [G, n, T] f32
    turn_valid: np.ndarray    # [G, n, T] bool: turns that happened, of valid episodes


def advantage_inputs(trajs: Sequence[Trajectory], group_size: int) -> AdvantageInputs:
    """See the module docstring. ``len(trajs)`` must be a multiple of ``group_size``."""
    if not trajs or len(trajs) % group_size:
        raise ValueError(f"{len(trajs)} trajectories do not form groups of {group_size}")
    shape = (len(trajs) // group_size, group_size)
    rewards = np.array([t.reward for t in trajs], np.float32).reshape(shape)
    valid = np.array([t.finish_reason != "error" for t in trajs]).reshape(shape)
    lengths = np.array([t.num_sampled_tokens for t in trajs], np.float32).reshape(shape)
    turns = max(1, max(t.num_turns for t in trajs))
    turn_rewards = np.zeros((len(trajs), turns), np.float32)
    turn_valid = np.zeros((len(trajs), turns), bool)
    for i, t in enumerate(trajs):
        if t.num_turns == 0 or t.finish_reason == "error":
            continue
        turn_valid[i, :t.num_turns] = True
        if t.turn_rewards is not None:
            turn_rewards[i, :len(t.turn_rewards)] = t.turn_rewards
        else:  # one reward for the episode: received at its last turn
            turn_rewards[i, t.num_turns - 1] = t.reward
    return AdvantageInputs(rewards, valid, lengths, turn_rewards.reshape(*shape, turns),
                           turn_valid.reshape(*shape, turns))


def compute_step_advantages(inputs: AdvantageInputs, name: str, params: Any) -> np.ndarray:
    """Advantages ``[G, n]`` (or ``[G, n, T]`` for a per-turn estimator) of the estimator
    ``name`` with ``params`` (the registry entry's parameter dataclass)."""
    est = ADVANTAGE_ESTIMATORS.get(name)
    if est.level == "turn":
        adv = compute_advantages(name, jnp.asarray(inputs.turn_rewards),
                                 jnp.asarray(inputs.turn_valid), params=params)
    else:
        lengths = jnp.asarray(inputs.lengths) if est.needs_lengths else None
        adv = compute_advantages(name, jnp.asarray(inputs.rewards), jnp.asarray(inputs.valid),
                                 params=params, lengths=lengths)
    return np.asarray(adv, np.float32)


def episode_segments(trajs: Sequence[Trajectory], advantages: np.ndarray,
                     valid: np.ndarray) -> list[Segment]:
    """One segment per sample of each valid episode. ``advantages``: ``[G, n]`` (one value per
    episode) or ``[G, n, T]`` (per turn: each token gets the advantage of its turn). A sample
    without a sampled token (a prompt that filled the context on its own) has nothing to train
    and is left out."""
    flat_adv = advantages.reshape(len(trajs), *advantages.shape[2:])
    flat_valid = valid.reshape(-1)
    segments = []
    for i, traj in enumerate(trajs):
        if not flat_valid[i]:
            continue
        for s in traj.samples:
            arr = s.arrays()
            if not arr["loss_mask"].any():
                continue
            if flat_adv.ndim == 1:
                adv: float | np.ndarray = float(flat_adv[i])
            else:
                turn = np.minimum(arr["turn_index"], flat_adv.shape[1] - 1)
                adv = flat_adv[i][turn] * (arr["loss_mask"] > 0)
            segments.append(Segment(arr["tokens"], arr["loss_mask"], arr["logprobs"], adv,
                                    index=i))
    return segments


def pack_for_update(segments: Sequence[Segment], row_lengths: Sequence[int], *,
                    row_multiple: int, mini_batches: int,
                    shared_prefix_min_tokens: int = 0, round_rows: str = "pow2") -> PackedBatch:
    """Pack so that the row count is a multiple of both ``row_multiple`` (few compiled shapes)
    and ``mini_batches`` (equal mini-batches); common prefixes of at least
    ``shared_prefix_min_tokens`` tokens are packed once per row (0: flat)."""
    return pack(segments, row_lengths, multiple=math.lcm(row_multiple, mini_batches),
                min_shared=shared_prefix_min_tokens, round_rows=round_rows)


def minibatch_rows(segment_ids: np.ndarray, mini_batches: int) -> list[np.ndarray]:
    """Row indices of each mini-batch: equal sizes, the real rows (any token with a segment)
    dealt out in turn so that each mini-batch gets ``ceil`` or ``floor`` of
    ``real / mini_batches`` of them and every real row appears in exactly one. Needs the row
    count to be a multiple of ``mini_batches`` (:func:`pack_for_update` makes it so)."""
    rows = segment_ids.shape[0]
    if rows % mini_batches:
        raise ValueError(f"{rows} rows do not split into {mini_batches} equal mini-batches")
    size = rows // mini_batches
    real = [r for r in range(rows) if (segment_ids[r] > 0).any()]
    pad = [r for r in range(rows) if not (segment_ids[r] > 0).any()]
    out: list[list[int]] = [[] for _ in range(mini_batches)]
    for j, r in enumerate(real):
        out[j % mini_batches].append(r)
    for mb in out:
        while len(mb) < size:
            mb.append(pad.pop(0))
    return [np.asarray(sorted(mb), np.int64) for mb in out]
