"""Advantage estimators: hand-computed cases, invariants, numpy-reference parity."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtrl_jax.kernels import (
    ADVANTAGE_ESTIMATORS,
    GroupBasedParams,
    PassKParams,
    PerTurnParams,
    broadcast_to_tokens,
    compute_advantages,
    group_based_advantages,
    group_diagnostics,
    grpo_passk_advantages,
    opo_advantages,
    per_turn_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from tests import reference_np as ref

SEQUENCE_METHODS = [n for n in ADVANTAGE_ESTIMATORS if ADVANTAGE_ESTIMATORS.get(n).level ==
                    "sequence"]


def run(method, rewards, valid=None, lengths=None, params=None):
    rewards = jnp.asarray(rewards, jnp.float32)
    if ADVANTAGE_ESTIMATORS.get(method).needs_lengths and lengths is None:
        lengths = jnp.ones(rewards.shape)
    return compute_advantages(method, rewards, valid, params=params, lengths=lengths)


class HandComputedTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo(self):
        r = jnp.array([[1.0, 0.0, 0.0, 1.0]])
        a = self.variant(lambda x: group_based_advantages(x))(r)
        # mean 0.5, unbiased std sqrt(1/3)
        s = math.sqrt(1 / 3)
        np.testing.assert_allclose(a[0], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dr_grpo_does_not_divide(self):
        r = jnp.array([[1.0, 0.0, 0.0, 1.0]])
        params = GroupBasedParams(normalize_by_std=False)
        a = self.variant(lambda x: group_based_advantages(x, params=params))(r)
        np.testing.assert_allclose(a[0], [0.5, -0.5, -0.5, 0.5])

    @chex.variants(with_jit=True, without_jit=True)
    def test_rloo(self):
        r = jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 0.0, 0.0]])
        valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
        a = self.variant(rloo_advantages)(r, valid)
        np.testing.assert_allclose(a[0], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], rtol=1e-6)
        np.testing.assert_allclose(a[1], [2.0, -2.0, 0.0, 0.0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_passk_binary_closed_form(self):
        # Chen et al. (2025): mu = 1 - C(neg,k)/C(n,k); A_pos = (1-mu)/sigma;
        # A_neg = (1 - mu - C(neg-1,k-1)/C(n-1,k-1))/sigma.
        n, neg, k = 8, 6, 3
        r = jnp.array([[1.0, 0, 0, 1, 0, 0, 0, 0]])
        a = self.variant(lambda x: grpo_passk_advantages(x, params=PassKParams(k=k, eps=0.0)))(r)
        mu = 1 - math.comb(neg, k) / math.comb(n, k)
        sigma = math.sqrt(mu * (1 - mu))
        a_pos = (1 - mu) / sigma
        a_neg = (1 - mu - math.comb(neg - 1, k - 1) / math.comb(n - 1, k - 1)) / sigma
        np.testing.assert_allclose(a[0], [a_pos, a_neg, a_neg, a_pos, a_neg, a_neg, a_neg, a_neg],
                                   rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_passk_k1_is_grpo_with_population_std(self):
        r = jnp.array([[0.3, 1.0, 0.0, 0.7, 0.7]])
        a = self.variant(lambda x: grpo_passk_advantages(x, params=PassKParams(k=1)))(r)
        b = group_based_advantages(r, params=GroupBasedParams(std_ddof=0))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_turn(self):
        # Two samples, 3 turn slots. Sample 0: rewards (0, 1, -) ; sample 1: (0.5, 0, 2).
        r = jnp.array([[[0.0, 1.0, 0.0], [0.5, 0.0, 2.0]]])
        valid = jnp.array([[[1, 1, 0], [1, 1, 1]]], bool)
        params = PerTurnParams(normalize_by_std=False)
        a = self.variant(lambda x, m: per_turn_advantages(x, m, params=params))(r, valid)
        # reward-to-go: s0 = (1, 1, -), s1 = (2.5, 2, 2); baselines per turn: 1.75, 1.5, 2
        np.testing.assert_allclose(a[0], [[-0.75, -0.5, 0.0], [0.75, 0.5, 0.0]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_turn_discount(self):
        r = jnp.array([[[0.0, 1.0], [0.0, 0.0]]])
        params = PerTurnParams(gamma=0.5, normalize_by_std=False)
        a = self.variant(lambda x: per_turn_advantages(x, params=params))(r)
        # to-go: s0 = (0.5, 1), s1 = (0, 0)
        np.testing.assert_allclose(a[0], [[0.25, 0.5], [-0.25, -0.5]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_reinforce_pp_and_opo(self):
        r = jnp.array([[1.0, 0.0], [0.0, 0.0]])
        a = self.variant(reinforce_pp_baseline_advantages)(r)
        # centred: (.5, -.5, 0, 0); batch std = sqrt(0.125)
        s = math.sqrt(0.125)
        np.testing.assert_allclose(a, [[0.5 / s, -0.5 / s], [0, 0]], rtol=1e-5)
        lengths = jnp.array([[1.0, 3.0], [2.0, 2.0]])
        b = self.variant(lambda x, n: opo_advantages(x, lengths=n))(r, lengths)
        np.testing.assert_allclose(b, [[0.75, -0.25], [0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("method", SEQUENCE_METHODS)
def test_equal_rewards_give_zero_advantage(method):
    r = np.array([[0.7] * 6, [0.0] * 6, [1.0] * 6], np.float32)
    np.testing.assert_array_equal(run(method, r), 0.0)


@pytest.mark.parametrize("method", SEQUENCE_METHODS)
def test_adding_a_constant_to_rewards_changes_nothing(method):
    rng = np.random.default_rng(0)
    r = rng.random((4, 6)).astype(np.float32)
    lengths = jnp.asarray(rng.integers(1, 20, (4, 6)))
    np.testing.assert_allclose(run(method, r, lengths=lengths),
                               run(method, r + 3.0, lengths=lengths), rtol=1e-4, atol=1e-5)


def test_per_turn_shift_invariance_and_turn0_equals_grpo_on_returns():
    rng = np.random.default_rng(1)
    r = rng.random((3, 5, 4)).astype(np.float32)
    a = per_turn_advantages(jnp.asarray(r))
    b = per_turn_advantages(jnp.asarray(r + 2.0))
    # adding c to every turn reward adds c * (turns left) -- the same for all samples at turn t
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[:, :, 0], group_based_advantages(jnp.asarray(r.sum(-1))),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", SEQUENCE_METHODS)
def test_invalid_samples_are_left_out(method):
    """A group with masked samples equals the same group without them."""
    rng = np.random.default_rng(2)
    r = rng.random((2, 6)).astype(np.float32)
    lengths = rng.integers(1, 9, (2, 6)).astype(np.float32)
    valid = np.array([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], bool)
    a = run(method, r, valid, lengths=jnp.asarray(lengths))
    assert np.all(np.asarray(a)[~valid] == 0.0)
    keep = valid[0]
    sub = run(method, r[:1, keep], lengths=jnp.asarray(lengths[:1, keep]))
    if method == "reinforce_pp_baseline":  # batch whitening: compare the group-centred part
        return
    np.testing.assert_allclose(np.asarray(a)[0, keep], sub[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", SEQUENCE_METHODS)
def test_vmap_and_no_recompilation(method):
    rng = np.random.default_rng(3)
    r = jnp.asarray(rng.random((3, 4, 6)).astype(np.float32))
    lengths = jnp.ones((3, 4, 6))
    f = lambda x, n: compute_advantages(method, x, lengths=n)
    batched = jax.vmap(f)(r, lengths)
    for i in range(3):
        np.testing.assert_allclose(batched[i], f(r[i], lengths[i]), rtol=1e-6, atol=1e-7)

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, n):
        return compute_advantages(method, x, lengths=n)

    for i in range(3):
        step(r[i], lengths[i])


def test_bad_input_fails_with_names_and_shapes():
    with pytest.raises(ValueError, match=r"'rewards' must have rank 2, got shape \(8,\)"):
        jax.jit(group_based_advantages)(jnp.zeros(8))
    with pytest.raises(ValueError, match=r"'valid' has shape \(2, 3\) but 'rewards' has shape "
                                         r"\(2, 4\)"):
        rloo_advantages(jnp.zeros((2, 4)), jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="needs 'lengths'"):
        compute_advantages("opo", jnp.zeros((2, 4)))
    with pytest.raises(KeyError, match="Did you mean 'rloo'"):
        compute_advantages("rlo", jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match="PassKParams"):
        compute_advantages("grpo_passk", jnp.zeros((2, 4)), params=GroupBasedParams())
    with pytest.raises(ValueError, match="k must be >= 1"):
        PassKParams(k=0)


def test_group_diagnostics():
    r = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    valid = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
    a = group_based_advantages(r, valid)
    d = jax.jit(group_diagnostics)(r, a, valid)
    # groups 0, 2 and 3 (valid members all 0.5) carry no signal
    np.testing.assert_allclose(d["analysis/zero_adv_groups"], 3 / 4)
    np.testing.assert_allclose(d["rollout/reward/valid_mean"], 1 / 3, rtol=1e-6)
    none = group_diagnostics(r[:1], a[:1])
    assert np.isnan(none["rollout/reward/valid_mean"])


def test_broadcast_sequence_and_turn_advantages_to_packed_tokens():
    # row 0: sample 2 (3 tokens) then sample 0 (2 tokens); row 1: sample 1 (4 tokens), pad.
    seg = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    sample_index = jnp.array([[2, 0], [1, -1]])
    adv = jnp.array([10.0, 20.0, 30.0])
    out = jax.jit(broadcast_to_tokens)(adv, seg, sample_index)
    np.testing.assert_array_equal(out, [[30, 30, 30, 10, 10], [20, 20, 20, 20, 0]])
    turns = jnp.array([[0, 1, 1, 0, 1], [0, 0, 1, 2, 0]])
    per_turn = jnp.array([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0], [6.0, 7.0, 0.0]])
    out = broadcast_to_tokens(per_turn, seg, sample_index, turns)
    np.testing.assert_array_equal(out, [[6, 7, 7, 1, 2], [3, 3, 4, 5, 0]])
    with pytest.raises(ValueError, match="'turn_index'"):
        broadcast_to_tokens(per_turn, seg, sample_index)


# ------------------------------------------------------------------------------ reference parity

group_rewards = st.integers(1, 4).flatmap(
    lambda g: st.integers(2, 7).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float32, (g, n), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])),
            hnp.arrays(bool, (g, n)),
            hnp.arrays(np.float32, (g, n), elements=st.integers(1, 30).map(float)),
        )
    )
)


@given(data=group_rewards, k=st.integers(1, 5), ddof=st.sampled_from([0, 1]),
       normalize=st.booleans())
def test_sequence_estimators_match_reference(data, k, ddof, normalize):
    r, valid, lengths = data
    valid[:, 0] = True
    got = group_based_advantages(jnp.asarray(r), jnp.asarray(valid),
                                 params=GroupBasedParams(normalize, ddof))
    np.testing.assert_allclose(got, ref.group_based(r, valid, normalize, ddof), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(rloo_advantages(jnp.asarray(r), jnp.asarray(valid)),
                               ref.rloo(r, valid), rtol=1e-5, atol=1e-5)
    got = grpo_passk_advantages(jnp.asarray(r), jnp.asarray(valid),
                                params=PassKParams(k=k, normalize_by_std=normalize))
    np.testing.assert_allclose(got, ref.passk_bruteforce(r, valid, k, normalize), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(
        reinforce_pp_baseline_advantages(jnp.asarray(r), jnp.asarray(valid)),
        ref.reinforce_pp(r, valid), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        opo_advantages(jnp.asarray(r), jnp.asarray(valid), lengths=jnp.asarray(lengths)),
        ref.opo(r, lengths, valid), rtol=1e-5, atol=1e-5)


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(2, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**31 - 1),
    gamma=st.sampled_from([1.0, 0.9]),
    normalize=st.booleans(),
)
def test_per_turn_matches_reference(shape, seed, gamma, normalize):
    rng = np.random.default_rng(seed)
    r = rng.choice([0.0, 0.5, 1.0], size=shape).astype(np.float32)
    # each sample has a prefix of turns
    n_turns = rng.integers(1, shape[2] + 1, size=shape[:2])
    valid = np.arange(shape[2])[None, None, :] < n_turns[..., None]
    got = per_turn_advantages(jnp.asarray(r), jnp.asarray(valid),
                              params=PerTurnParams(gamma=gamma, normalize_by_std=normalize))
    np.testing.assert_allclose(got, ref.per_turn(r, valid, gamma, normalize), rtol=1e-4,
                               atol=1e-4)
