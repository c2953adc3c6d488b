"""The update step on its own: packed arrays of literal tokens in, LoRA updates and metrics out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.config import load_config
from mtrl_jax.kernels import LossConfig, PolicyLossInputs, PPOParams, policy_loss
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.models.lora import split_lora
from mtrl_jax.rollout.runner import build_policy
from mtrl_jax.training.batch import pack_for_update
from mtrl_jax.training.packing import Segment
from mtrl_jax.training.update import Updater, make_optimizer
from tests.test_trainer import TINY


def _segments():
    """Three episodes of byte tokens: prompt (mask 0), answer (mask 1)."""
    out = []
    for i, (n_ctx, n_ans, adv) in enumerate([(5, 4, 1.0), (3, 6, -1.0), (4, 2, 0.5)]):
        toks = np.arange(40 + i, 40 + i + n_ctx + n_ans, dtype=np.int32)
        mask = np.r_[np.zeros(n_ctx, np.int8), np.ones(n_ans, np.int8)]
        out.append(Segment(toks, mask, np.where(mask > 0, -5.5, 0.0).astype(np.float32), adv,
                           index=i))
    return out


def _setup(*overrides):
    c = load_config(overrides=TINY + ["packing.row_lengths=[16]", "rollout.max_context_tokens=16",
                                      *overrides])
    _, model = build_policy(c)
    graphdef, lora, base = split_lora(model)
    tx, _ = make_optimizer(c)
    return c, graphdef, lora, base, tx, Updater(graphdef, tx, c)


def test_the_update_calls_the_loss_on_the_packed_arrays():
    _, graphdef, lora, base, tx, update = _setup("optimizer.mini_batches=1",
                                                 "packing.row_multiple=1")
    batch = pack_for_update(_segments(), (16,), row_multiple=1, mini_batches=1)
    assert batch.shape == (2, 16) and batch.num_tokens == 24
    new_lora, _, m = update(lora, tx.init(lora), base, batch)
    # the same loss computed by hand from the model's log-probs and the kernel
    from flax import nnx

    lp = token_logprobs(nnx.merge(graphdef, lora, base), jnp.asarray(batch.tokens),
                        jnp.asarray(batch.positions), jnp.asarray(batch.segment_ids)).logprobs
    ref, _ = policy_loss("ppo", PolicyLossInputs(lp, lp, jnp.asarray(batch.advantages),
                                                 jnp.asarray(batch.loss_mask),
                                                 jnp.asarray(batch.segment_ids)),
                         PPOParams(), LossConfig())
    assert m["train/loss"] == pytest.approx(float(ref), rel=1e-5)
    assert m["train/tokens"] == 24 and m["train/empty_minibatches"] == 0
    assert m["train/grad_norm"] > 0
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(lora), jax.tree.leaves(new_lora), strict=True)]
    assert any(changed)


def test_a_minibatch_without_real_rows_is_not_stepped():
    _, _, lora, base, tx, update = _setup("optimizer.mini_batches=4", "packing.row_multiple=1")
    batch = pack_for_update(_segments(), (16,), row_multiple=1, mini_batches=4)
    real = int((batch.segment_ids > 0).any(axis=1).sum())
    assert batch.shape[0] == 4 and real == 2  # two rows hold the three episodes
    _, opt_state, m = update(lora, tx.init(lora), base, batch)
    assert m["train/empty_minibatches"] == 2
    # adam counted exactly the two real mini-batches (an empty one would still move weights)
    counts = {int(x) for x in jax.tree.leaves(opt_state) if np.asarray(x).dtype == np.int32}
    assert counts == {2}
    assert np.isfinite(m["train/loss"]) and m["train/ratio_max"] >= 1.0


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_learning_rate_schedule_warms_up_then_decays_to_the_floor_at_the_last_step(decay):
    import math

    from mtrl_jax.training.update import lr_schedule

    c = load_config(overrides=TINY + ["steps=21", "optimizer.learning_rate=1e-3",
                                      "optimizer.warmup_steps=5", f"optimizer.decay={decay}",
                                      "optimizer.min_lr_ratio=0.1"])
    s = lr_schedule(c.optimizer, c.steps)
    lrs = np.array([float(s(i)) for i in range(25)])
    np.testing.assert_allclose(lrs[:6], [0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6, atol=1e-12)
    # decays over steps 5..20 (the run's last), then holds its floor
    t = (np.arange(5, 21) - 5) / 15
    want = {"constant": np.full(16, 1e-3),
            "cosine": 1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(math.pi * t)),
            "linear": 1e-3 - 0.9e-3 * t}[decay]
    np.testing.assert_allclose(lrs[5:21], want, rtol=1e-5)
    np.testing.assert_allclose(lrs[21:], want[-1], rtol=1e-5)
    # make_optimizer's schedule is this one, over the run's steps (min_lr_ratio 0: ends at 0)
    c2 = load_config(overrides=TINY + ["steps=3", "optimizer.learning_rate=1e-3",
                                       f"optimizer.decay={decay}", "optimizer.mini_batches=2"])
    _, sched = make_optimizer(c2)
    assert float(sched(0)) == pytest.approx(1e-3)
    assert float(sched(2)) == pytest.approx(1e-3 if decay == "constant" else 0.0, abs=1e-12)

