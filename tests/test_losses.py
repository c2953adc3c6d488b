"""Policy losses: hand-computed cases (jitted and not), invariants, numpy-reference parity."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from mtrl_jax.kernels import (
    AGGREGATIONS,
    POLICY_LOSSES,
    CISPOParams,
    GSPOParams,
    ISParams,
    LossConfig,
    PolicyLossInputs,
    PPOParams,
    TISParams,
    aggregate,
    kl_estimate,
    policy_loss,
)
from tests import reference_np as ref
from tests.packed_data import pack, packed_batches, scatter

LOSS_PARAMS = {
    "ppo": PPOParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "cispo": CISPOParams(clip_low=1.0, clip_high=0.5),
    "is": ISParams(max_weight=1.5),
    "gspo": GSPOParams(clip_low=0.05, clip_high=0.08),
}
REF_PARAMS = {
    "ppo": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "cispo": dict(clip_low=1.0, clip_high=0.5),
    "is": dict(max_weight=1.5),
    "gspo": dict(clip_low=0.05, clip_high=0.08),
}


def one_row(log_ratios, advantages, mask=None, seg=None):
    """Inputs for a single row with old = 0 so that log ratio = logp."""
    lr = jnp.asarray(log_ratios, jnp.float32)[None]
    n = lr.shape[1]
    return PolicyLossInputs(
        logprobs=lr,
        old_logprobs=jnp.zeros_like(lr),
        advantages=jnp.asarray(advantages, jnp.float32)[None],
        loss_mask=jnp.ones((1, n), bool) if mask is None else jnp.asarray(mask, bool)[None],
        segment_ids=jnp.ones((1, n), jnp.int32) if seg is None else jnp.asarray(seg)[None],
    )


class HandComputedTest(parameterized.TestCase):
    """Tiny cases worked out by hand, each run jitted and un-jitted."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppo_asymmetric_clip(self):
        # ratios 1.5, 0.5, 0.5, 1.1 with A = +1, +1, -1, +1, range [0.8, 1.2]
        inp = one_row([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)],
                      [1.0, 1.0, -1.0, 1.0])
        fn = self.variant(lambda x: policy_loss("ppo", x, PPOParams(0.2, 0.2)))
        loss, m = fn(inp)
        # per token: -min(1.5, 1.2) = -1.2; -min(.5, .8) = -.5; -min(-.5, -.8) = .8; -1.1
        np.testing.assert_allclose(loss, (-1.2 - 0.5 + 0.8 - 1.1) / 4, rtol=1e-6)
        np.testing.assert_allclose(m["clip_frac"], 2 / 4)
        np.testing.assert_allclose(m["ratio_max"], 1.5, rtol=1e-6)
        np.testing.assert_allclose(m["ratio_min"], 0.5, rtol=1e-6)
        np.testing.assert_allclose(m["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.1) / 4, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppo_clip_high_differs_from_clip_low(self):
        inp = one_row([math.log(1.25)], [1.0])
        loss_sym, _ = self.variant(lambda x: policy_loss("ppo", x, PPOParams(0.2, 0.2)))(inp)
        loss_hi, _ = self.variant(lambda x: policy_loss("ppo", x, PPOParams(0.2, 0.28)))(inp)
        np.testing.assert_allclose(loss_sym, -1.2, rtol=1e-6)
        np.testing.assert_allclose(loss_hi, -1.25, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppo_dual_clip(self):
        # ratio 5, A = -1: PPO gives max(5, 1.2) = 5; dual clip c = 3 bounds it at 3.
        inp = one_row([math.log(5.0), 0.0], [-1.0, -1.0])
        loss, m = self.variant(lambda x: policy_loss("ppo", x, PPOParams(dual_clip=3.0)))(inp)
        np.testing.assert_allclose(loss, (3.0 + 1.0) / 2, rtol=1e-6)
        np.testing.assert_allclose(m["dual_clip_frac"], 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cispo_weight_and_gradient(self):
        # ratios 2 and 0.5, A = 1 and -2; weights clipped to [0, 1.28] -> 1.28 and 0.5.
        inp = one_row([math.log(2.0), math.log(0.5)], [1.0, -2.0])

        def f(lp):
            return policy_loss("cispo", inp._replace(logprobs=lp))

        (loss, m), grad = self.variant(jax.value_and_grad(f, has_aux=True))(inp.logprobs)
        np.testing.assert_allclose(loss, (-1.28 * 1.0 + 0.5 * 2.0) / 2, rtol=1e-6)
        # d/dlogp of -sg(w) A logp = -w A, over 2 tokens
        np.testing.assert_allclose(grad[0], [-1.28 / 2, 1.0 / 2], rtol=1e-6)
        np.testing.assert_allclose(m["clip_frac"], 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_is_truncation(self):
        inp = one_row([math.log(3.0), math.log(0.25)], [1.0, 1.0])
        f = lambda lp: policy_loss("is", inp._replace(logprobs=lp), ISParams(max_weight=2.0))[0]
        grad = self.variant(jax.grad(f))(inp.logprobs)
        np.testing.assert_allclose(grad[0], [-2.0 / 2, -0.25 / 2], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gspo_sequence_ratio(self):
        # One segment of 2 tokens with log ratios 0.1 and 0.3: s = exp(0.2).
        inp = one_row([0.1, 0.3], [1.0, 1.0])
        params = GSPOParams(clip_low=0.5, clip_high=0.5)
        cfg = LossConfig(aggregation="seq_mean_token_mean")

        def f(lp):
            return policy_loss("gspo", inp._replace(logprobs=lp), params, cfg)

        (loss, m), grad = self.variant(jax.value_and_grad(f, has_aux=True))(inp.logprobs)
        s = math.exp(0.2)
        np.testing.assert_allclose(loss, -s, rtol=1e-6)
        np.testing.assert_allclose(grad[0], [-s / 2, -s / 2], rtol=1e-6)
        np.testing.assert_allclose(m["seq_ratio_mean"], s, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_aggregations(self):
        # Segment 1: tokens 0-2 (losses 1, 2, 3), segment 2: token 3 (loss 10), then padding.
        per_token = jnp.array([[1.0, 2.0, 3.0, 10.0, 99.0]])
        seg = jnp.array([[1, 1, 1, 2, 0]])
        mask = seg > 0
        agg = self.variant(
            lambda x, mode: aggregate(x, mask, seg, mode, norm_length=4), static_argnums=1
        )
        np.testing.assert_allclose(agg(per_token, "token_mean"), 16 / 4)
        np.testing.assert_allclose(agg(per_token, "seq_mean_token_mean"), (2 + 10) / 2)
        np.testing.assert_allclose(agg(per_token, "seq_mean_token_sum"), (6 + 10) / 2)
        np.testing.assert_allclose(agg(per_token, "seq_mean_token_sum_norm"), 16 / (2 * 4))

    @chex.variants(with_jit=True, without_jit=True)
    def test_kl_penalty_and_estimators(self):
        logp = jnp.array([[-1.0, -2.0]])
        ref_lp = jnp.array([[-1.5, -1.0]])
        x = np.array([-0.5, 1.0])  # ref - logp
        k1, k2, k3 = -x, 0.5 * x**2, np.exp(x) - 1 - x
        for name, want in (("k1", k1), ("k2", k2), ("k3", k3)):
            got = self.variant(lambda a, b, n=name: kl_estimate(a, b, n))(logp, ref_lp)
            np.testing.assert_allclose(got[0], want, rtol=1e-6)
        inp = PolicyLossInputs(logp, jax.lax.stop_gradient(logp), jnp.zeros((1, 2)),
                               jnp.ones((1, 2), bool), jnp.ones((1, 2), jnp.int32),
                               ref_logprobs=ref_lp)
        cfg = LossConfig(kl_coef=0.1, kl_estimator="k3")
        loss, m = self.variant(lambda i: policy_loss("ppo", i, config=cfg))(inp)
        np.testing.assert_allclose(loss, 0.1 * k3.mean(), rtol=1e-6)
        np.testing.assert_allclose(m["kl"], k3.mean(), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_bonus_and_metric(self):
        inp = one_row([0.0, 0.0], [1.0, 1.0])._replace(entropy=jnp.array([[2.0, 4.0]]))
        cfg = LossConfig(entropy_coef=0.01)
        loss, m = self.variant(lambda i: policy_loss("ppo", i, config=cfg))(inp)
        np.testing.assert_allclose(loss, -1.0 - 0.01 * 3.0, rtol=1e-6)
        np.testing.assert_allclose(m["entropy"], 3.0, rtol=1e-6)
        # without a per-token entropy, the metric is the sampled-token estimate mean(-logp)
        _, m2 = self.variant(lambda i: policy_loss("ppo", i))(one_row([-1.0, -3.0], [1.0, 1.0]))
        np.testing.assert_allclose(m2["entropy"], 2.0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tis_truncates_sampler_mismatch(self):
        inp = one_row([0.0, 0.0], [1.0, 1.0])
        inp = inp._replace(behaviour_logprobs=jnp.array([[-math.log(4.0), 0.0]]))
        cfg = LossConfig(tis=TISParams(mode="truncate", cap=2.0))
        loss, m = self.variant(lambda i: policy_loss("ppo", i, config=cfg))(inp)
        # w = old/mu = 4 -> truncated to 2; and 1.
        np.testing.assert_allclose(loss, -(2.0 + 1.0) / 2, rtol=1e-6)
        np.testing.assert_allclose(m["is_weight_max"], 4.0, rtol=1e-5)
        np.testing.assert_allclose(m["is_clip_frac"], 0.5)
        cfg_mask = LossConfig(tis=TISParams(mode="mask", cap=2.0))
        loss_m, _ = self.variant(lambda i: policy_loss("ppo", i, config=cfg_mask))(inp)
        np.testing.assert_allclose(loss_m, -(0.0 + 1.0) / 2, rtol=1e-6)


# ------------------------------------------------------------------------------ invariants


def _inputs(b, adv=None):
    return PolicyLossInputs(
        logprobs=jnp.asarray(b["logp"]),
        old_logprobs=jnp.asarray(b["old"]),
        advantages=jnp.asarray(b["adv"] if adv is None else adv),
        loss_mask=jnp.asarray(b["mask"]),
        segment_ids=jnp.asarray(b["seg"]),
        behaviour_logprobs=jnp.asarray(b["behaviour"]),
        ref_logprobs=jnp.asarray(b["ref"]),
    )


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_masked_and_padding_tokens_get_exactly_zero_gradient(name, aggregation):
    rng = np.random.default_rng(0)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.int32)
    mask = np.array([[0, 1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1, 1]], bool)  # 1s on padding too
    logp = -rng.exponential(1.0, seg.shape).astype(np.float32)
    logp[seg == 0] = -np.inf  # garbage on padding must not leak
    logp[0, 0] = np.nan  # nor on masked tokens
    b = dict(logp=logp, old=logp + 0.1, behaviour=logp - 0.1, ref=logp + 0.2,
             adv=rng.normal(size=seg.shape).astype(np.float32), mask=mask, seg=seg)
    b["old"][0, 0] = np.nan
    cfg = LossConfig(aggregation=aggregation, norm_length=8, kl_coef=0.05,
                     tis=TISParams(mode="truncate"))

    def f(lp):
        return policy_loss(name, _inputs(b)._replace(logprobs=lp), LOSS_PARAMS[name], cfg)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(logp))
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    counted = mask & (seg > 0)
    grad = np.asarray(grad)
    assert np.all(grad[~counted] == 0.0)
    assert np.any(grad[counted] != 0.0)


def test_ppo_gradient_is_zero_where_clip_is_active():
    # A > 0 with ratio above 1 + clip_high, and A < 0 with ratio below 1 - clip_low: clipped.
    # A > 0 with low ratio, A < 0 with high ratio: unclipped, gradient -A * r / N.
    ratios = np.array([1.5, 0.5, 0.5, 1.5, 1.0], np.float32)
    adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0], np.float32)
    inp = one_row(np.log(ratios), adv)
    f = lambda lp: policy_loss("ppo", inp._replace(logprobs=lp), PPOParams(0.2, 0.28))[0]
    grad = np.asarray(jax.grad(f)(inp.logprobs))[0]
    assert grad[0] == 0.0 and grad[1] == 0.0
    np.testing.assert_allclose(grad[2:], -adv[2:] * ratios[2:] / 5, rtol=1e-6)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_packed_equals_unpacked(name, aggregation):
    """The same sequences packed 3-to-a-row or one per row give the same loss and gradients."""
    rng = np.random.default_rng(1)
    lengths = [5, 3, 7, 2, 4, 6]
    seqs = []
    for n in lengths:
        logp = -rng.exponential(1.0, n).astype(np.float32)
        seqs.append(dict(
            logp=logp, old=logp + rng.normal(0, 0.2, n).astype(np.float32),
            behaviour=logp + rng.normal(0, 0.2, n).astype(np.float32),
            ref=logp + rng.normal(0, 0.2, n).astype(np.float32),
            adv=np.full(n, rng.normal(), np.float32), mask=rng.random(n) < 0.8,
        ))
    cfg = LossConfig(aggregation=aggregation, norm_length=16, kl_coef=0.1,
                     tis=TISParams(mode="truncate", level="geometric"))

    def run(rows, length):
        seg, placement, _ = pack(lengths, rows, length)
        b = {k: scatter(placement, [s[k] for s in seqs], rows, length,
                        dtype=bool if k == "mask" else np.float32)
             for k in seqs[0]}
        b["seg"] = seg
        inp = _inputs(b)

        def f(lp):
            return policy_loss(name, inp._replace(logprobs=lp), LOSS_PARAMS[name], cfg)[0]

        loss, grad = jax.value_and_grad(f)(inp.logprobs)
        per_seq = [np.asarray(grad)[r, s:s + n] for r, s, n in placement]
        return float(loss), per_seq

    packed_loss, packed_grads = run(rows=3, length=10)
    unpacked_loss, unpacked_grads = run(rows=6, length=8)
    np.testing.assert_allclose(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(packed_grads, unpacked_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_segment_ids_need_not_be_contiguous(name):
    """Relabelling segments (ids 1,2 -> 7,3) changes nothing."""
    b = dict(logp=np.array([[-1.0, -0.5, -2.0, -0.1]], np.float32),
             old=np.array([[-1.1, -0.4, -2.2, -0.3]], np.float32),
             behaviour=np.zeros((1, 4), np.float32), ref=np.zeros((1, 4), np.float32),
             adv=np.array([[1.0, 1.0, -1.0, -1.0]], np.float32),
             mask=np.ones((1, 4), bool), seg=np.array([[1, 1, 2, 2]], np.int32))
    cfg = LossConfig(aggregation="seq_mean_token_mean")
    a, _ = policy_loss(name, _inputs(b), LOSS_PARAMS[name], cfg)
    b["seg"] = np.array([[3, 3, 7, 7]], np.int32)
    c, _ = policy_loss(name, _inputs(b), LOSS_PARAMS[name], cfg)
    np.testing.assert_allclose(a, c, rtol=1e-6)


def test_on_policy_first_step_ratio_is_one():
    rng = np.random.default_rng(3)
    logp = jnp.asarray(-rng.exponential(size=(2, 6)).astype(np.float32))
    inp = PolicyLossInputs(logp, jax.lax.stop_gradient(logp),
                           jnp.asarray(rng.normal(size=(2, 6)).astype(np.float32)),
                           jnp.ones((2, 6), bool), jnp.ones((2, 6), jnp.int32))
    for name in POLICY_LOSSES.names():
        _, m = policy_loss(name, inp)
        np.testing.assert_allclose(m["ratio_mean"], 1.0, rtol=1e-6)
        assert float(m["clip_frac"]) == 0.0
        np.testing.assert_allclose(m["approx_kl"], 0.0, atol=1e-7)


def test_denominator_override_matches_global_token_mean():
    """Two micro-batches normalised by the global token count sum to the full-batch loss."""
    rng = np.random.default_rng(4)
    b = dict(logp=-rng.exponential(size=(4, 6)).astype(np.float32))
    b.update(old=b["logp"] + 0.1, behaviour=b["logp"], ref=b["logp"],
             adv=rng.normal(size=(4, 6)).astype(np.float32),
             mask=rng.random((4, 6)) < 0.7, seg=np.ones((4, 6), np.int32))
    full, _ = policy_loss("ppo", _inputs(b))
    total = float(b["mask"].sum())
    parts = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        part = {k: val[sl] for k, val in b.items()}
        parts += float(policy_loss("ppo", _inputs(part), denominator=total)[0])
    np.testing.assert_allclose(parts, full, rtol=1e-6)


def test_vmap_over_minibatches_equals_loop():
    rng = np.random.default_rng(5)
    shape = (3, 2, 8)  # 3 mini-batches of [2, 8]
    logp = -rng.exponential(size=shape).astype(np.float32)
    stacked = PolicyLossInputs(
        jnp.asarray(logp), jnp.asarray(logp + 0.05),
        jnp.asarray(rng.normal(size=shape).astype(np.float32)),
        jnp.asarray(rng.random(shape) < 0.8), jnp.ones(shape, jnp.int32))
    for name in POLICY_LOSSES.names():
        f = lambda x, n=name: policy_loss(n, x, LOSS_PARAMS[n])[0]
        batched = jax.jit(jax.vmap(f))(stacked)
        looped = [f(jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(shape[0])]
        np.testing.assert_allclose(batched, looped, rtol=1e-6)


def test_no_recompilation_across_steps():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(inp):
        f = lambda lp: policy_loss("ppo", inp._replace(logprobs=lp), PPOParams(0.2, 0.28))[0]
        return jax.value_and_grad(f)(inp.logprobs)

    rng = np.random.default_rng(6)
    for _ in range(4):
        logp = -rng.exponential(size=(2, 16)).astype(np.float32)
        step(PolicyLossInputs(jnp.asarray(logp), jnp.asarray(logp + 0.1),
                              jnp.asarray(rng.normal(size=(2, 16)).astype(np.float32)),
                              jnp.ones((2, 16), bool), jnp.ones((2, 16), jnp.int32)))


# ------------------------------------------------------------------------------ bad input


def test_shape_mismatch_names_argument_and_shapes():
    inp = one_row([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    bad = inp._replace(old_logprobs=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"'old_logprobs' has shape \(1, 2\) but 'logprobs' "
                                         r"has shape \(1, 3\)"):
        jax.jit(lambda x: policy_loss("ppo", x))(bad)
    with pytest.raises(ValueError, match=r"'logprobs' must have rank 2, got shape \(3,\)"):
        policy_loss("ppo", inp._replace(logprobs=jnp.zeros(3)))
    with pytest.raises(ValueError, match="'segment_ids' must be an integer array"):
        policy_loss("ppo", inp._replace(segment_ids=jnp.ones((1, 3))))
    with pytest.raises(ValueError, match="needs 'behaviour_logprobs'"):
        policy_loss("ppo", inp, config=LossConfig(tis=TISParams(mode="truncate")))
    with pytest.raises(ValueError, match="needs 'ref_logprobs'"):
        policy_loss("ppo", inp, config=LossConfig(kl_coef=0.1))
    with pytest.raises(KeyError, match="Did you mean 'cispo'"):
        policy_loss("cipso", inp)
    with pytest.raises(TypeError, match="takes params of type PPOParams"):
        policy_loss("ppo", inp, CISPOParams())


def test_bad_hyper_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="clip_low"):
        PPOParams(clip_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        PPOParams(dual_clip=0.5)
    with pytest.raises(ValueError, match="norm_length"):
        LossConfig(aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="token_sum")


# ------------------------------------------------------------------------------ reference parity


@given(
    batch=packed_batches(),
    name=st.sampled_from(["ppo", "cispo", "is", "gspo"]),
    aggregation=st.sampled_from(AGGREGATIONS),
    kl=st.sampled_from([None, "k1", "k2", "k3"]),
    tis=st.sampled_from([("none", "token"), ("truncate", "token"), ("mask", "token"),
                         ("truncate", "sequence"), ("truncate", "geometric")]),
)
def test_matches_numpy_reference(batch, name, aggregation, kl, tis):
    b = batch
    cfg = LossConfig(aggregation=aggregation, norm_length=12, kl_coef=0.0 if kl is None else 0.2,
                     kl_estimator=kl or "k3", tis=TISParams(mode=tis[0], level=tis[1], cap=1.5))

    def f(lp):
        return policy_loss(name, _inputs(b)._replace(logprobs=lp), LOSS_PARAMS[name], cfg)[0]

    # jitted: one compilation per example is ~5x faster than running its ops one by one
    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(b["logp"]))
    want_loss, want_grad = ref.policy_loss(
        name, b["logp"], b["old"], b["adv"], b["mask"], b["seg"], params=REF_PARAMS[name],
        aggregation=aggregation, norm_length=12, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
        ref=b["ref"], behaviour=b["behaviour"], tis_mode=tis[0], tis_level=tis[1], tis_cap=1.5)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-6)
