"""From trajectories to packed rows: literal tokens in, packed arrays out; every real row is
trained on exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrl_jax.kernels import PerTurnParams, RLOOParams
from mtrl_jax.rollout.trajectory import Sample, Trajectory
from mtrl_jax.training.batch import (
    advantage_inputs,
    compute_step_advantages,
    episode_segments,
    minibatch_rows,
    pack_for_update,
)
from mtrl_jax.training.packing import Segment


def traj(turns: list[tuple[list[int], list[int]]], reward: float, *, turn_rewards=None,
         finish: str = "answered", eid: str = "e") -> Trajectory:
    """An episode of literal tokens: per turn (context tokens, sampled tokens)."""
    s = Sample()
    for i, (ctx, sampled) in enumerate(turns):
        s.add_context(ctx, i)
        s.add_sampled(sampled, [-0.5] * len(sampled), i)
    return Trajectory(task_id="t", episode_id=eid, samples=[s], messages=[],
                      finish_reason=finish, num_turns=len(turns), reward=reward,
                      turn_rewards=turn_rewards)


def test_advantage_inputs_from_literal_episodes():
    group = [traj([([1, 2], [3, 4, 5])], 1.0),
             traj([([1, 2], [6]), ([7], [8, 9])], 0.0, turn_rewards=[0.5, -0.5]),
             traj([([1, 2], [3])], 0.75, finish="error")]
    x = advantage_inputs(group, group_size=3)
    np.testing.assert_array_equal(x.rewards, [[1.0, 0.0, 0.75]])
    np.testing.assert_array_equal(x.valid, [[True, True, False]])
    np.testing.assert_array_equal(x.lengths, [[3, 3, 1]])
    # a scalar reward arrives at the last turn; per-turn rewards as reported; errors count not
    np.testing.assert_array_equal(x.turn_rewards, [[[1.0, 0.0], [0.5, -0.5], [0.0, 0.0]]])
    np.testing.assert_array_equal(x.turn_valid, [[[True, False], [True, True], [False, False]]])
    with pytest.raises(ValueError, match="groups of 2"):
        advantage_inputs(group, group_size=2)


def test_segments_carry_episode_or_turn_advantages_on_literal_tokens():
    group = [traj([([1, 2], [3, 4])], 1.0, eid="a"),
             traj([([1, 2], [5]), ([6, 7], [8, 9, 10])], 0.0, turn_rewards=[1.0, -1.0],
                  eid="b"),
             traj([([1], [2])], 0.0, finish="error", eid="c")]
    x = advantage_inputs(group, 3)
    adv = compute_step_advantages(x, "rloo", RLOOParams())
    np.testing.assert_allclose(adv, [[1.0, -1.0, 0.0]])  # the error episode left out
    segs = episode_segments(group, adv, x.valid)
    assert [s.index for s in segs] == [0, 1]  # no segment for the failed episode
    np.testing.assert_array_equal(segs[1].tokens, [1, 2, 5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(segs[1].loss_mask, [0, 0, 1, 0, 0, 1, 1, 1])
    assert segs[0].advantage == 1.0 and segs[1].advantage == -1.0

    turn = compute_step_advantages(x, "group_based_per_turn",
                                   PerTurnParams(normalize_by_std=False))
    # reward-to-go: a = [1, 0] (terminal), b = [0, -1]; turn 0 baseline over a, b: 0.5;
    # turn 1 only b has one: baseline -1
    np.testing.assert_allclose(turn[0, :2], [[0.5, 0.0], [-0.5, 0.0]])
    segs = episode_segments(group, turn, x.valid)
    np.testing.assert_allclose(segs[1].advantage, [0, 0, -0.5, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(segs[0].advantage, [0, 0, 0.5, 0.5])
    b = pack_for_update(segs, (16,), row_multiple=1, mini_batches=1)
    row = b.segment_ids[0] == 2
    np.testing.assert_array_equal(b.tokens[0][row], [1, 2, 5, 6, 7, 8, 9, 10])
    np.testing.assert_allclose(b.advantages[0][row], [0, 0, -0.5, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(b.behaviour_logprobs[0][row], [0, 0, -0.5, 0, 0, -0.5, -0.5, -0.5])


def test_a_sample_without_sampled_tokens_is_not_packed():
    # a prompt that fills the context alone: the episode ends before its first token
    long_prompt = traj([([1] * 300, [])], 0.0, finish="truncated")
    group = [long_prompt, traj([([1, 2], [3])], 1.0)]
    x = advantage_inputs(group, 2)
    segs = episode_segments(group, compute_step_advantages(x, "rloo", RLOOParams()), x.valid)
    assert [s.index for s in segs] == [1]
    pack_for_update(segs, (16,), row_multiple=1, mini_batches=1)  # fits: the 300 are not there


def test_three_minibatches_over_a_row_multiple_of_four_train_every_row():
    # the old trainer packed 8 real rows to 8 and took rows // 3 = 2 per mini-batch: 2 never
    # trained, without a message
    segs = [Segment(np.arange(1, 9), np.ones(8, np.int8), np.zeros(8, np.float32), 1.0)
            for _ in range(8)]
    b = pack_for_update(segs, (8,), row_multiple=4, mini_batches=3)
    assert b.shape[0] % 3 == 0 and b.shape[0] % 4 == 0
    groups = minibatch_rows(b.segment_ids, 3)
    real = [r for g in groups for r in g if (b.segment_ids[r] > 0).any()]
    assert sorted(real) == list(range(8))
    assert [int((b.segment_ids[g] > 0).any(axis=1).sum()) for g in groups] == [3, 3, 2]


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
       mini_batches=st.integers(1, 6), row_multiple=st.integers(1, 8))
def test_every_real_row_is_trained_exactly_once_per_epoch(lengths, mini_batches, row_multiple):
    segs = [Segment(np.full(n, i + 1, np.int32), np.ones(n, np.int8), np.zeros(n, np.float32),
                    float(i), index=i) for i, n in enumerate(lengths)]
    b = pack_for_update(segs, (16, 64), row_multiple=row_multiple, mini_batches=mini_batches)
    groups = minibatch_rows(b.segment_ids, mini_batches)
    assert len(groups) == mini_batches
    assert len({len(g) for g in groups}) == 1  # one mini-batch shape
    every = np.concatenate(groups)
    assert sorted(every) == list(range(b.shape[0]))  # each row in exactly one mini-batch
    real = [int((b.segment_ids[g] > 0).any(axis=1).sum()) for g in groups]
    assert max(real) - min(real) <= 1  # real rows dealt out evenly
    # every segment (each episode's tokens) appears once over the mini-batches
    seen = sorted(int(i) for g in groups for i in np.unique(b.segment_index[g]) if i >= 0)
    assert seen == list(range(len(lengths)))


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=40),
       row_multiple=st.integers(1, 6))
def test_row_rounding_policies(lengths, row_multiple):
    segs = [Segment(np.full(n, i + 1, np.int32), np.ones(n, np.int8), np.zeros(n, np.float32),
                    float(i), index=i) for i, n in enumerate(lengths)]
    pow2 = pack_for_update(segs, (64,), row_multiple=row_multiple, mini_batches=1)
    mult = pack_for_update(segs, (64,), row_multiple=row_multiple, mini_batches=1,
                           round_rows="multiple")
    used = int((mult.segment_ids > 0).any(axis=1).sum())
    assert used == int((pow2.segment_ids > 0).any(axis=1).sum())
    # "multiple": the next multiple of row_multiple; "pow2": row_multiple x 2^j
    assert mult.shape[0] == row_multiple * -(-used // row_multiple)
    j = pow2.shape[0] // row_multiple
    assert pow2.shape[0] % row_multiple == 0 and j & (j - 1) == 0 and pow2.shape[0] >= used
    assert mult.shape[0] <= pow2.shape[0] and mult.num_tokens == pow2.num_tokens
    with pytest.raises(ValueError, match="round_rows"):
        pack_for_update(segs, (64,), row_multiple=1, mini_batches=1, round_rows="nearest")


def test_the_row_length_that_computes_fewest_tokens_is_chosen():
    # 6 segments of 200 tokens: rows of 256 hold one each (6 rows -> 8 with pow2 from 4 =
    # 2,048 tokens); rows of 512 hold two (3 rows -> 4 = 2,048: a tie, the shorter wins);
    # rows of 1024 hold five (2 rows -> 4 = 4,096)
    segs = [Segment(np.full(200, i + 1, np.int32), np.ones(200, np.int8),
                    np.zeros(200, np.float32), 0.0, index=i) for i in range(6)]
    assert pack_for_update(segs, (256, 512, 1024), row_multiple=4, mini_batches=1).shape == \
        (8, 256)
    # rounding to multiples of 2: 6 x 256 = 1,536 vs 4 x 512 = 2,048 vs 2 x 1024
    b = pack_for_update(segs, (256, 512, 1024), row_multiple=2, mini_batches=1,
                        round_rows="multiple")
    assert b.shape == (6, 256)
    # one row of 1,280 holds all six: 1,280 < 1,536
    b = pack_for_update(segs, (256, 1280), row_multiple=1, mini_batches=1,
                        round_rows="multiple")
    assert b.shape == (1, 1280) and b.efficiency == 1200 / 1280
