"""Shared-prefix (tree) packing: a group's common prompt packed once per row, its episodes
attending to it. The loss and every LoRA gradient must equal flat packing's; the attention mask
must equal a dense reference built from the episodes themselves."""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtrl_jax.config import load_config
from mtrl_jax.kernels import AGGREGATIONS
from mtrl_jax.models.lora import split_lora
from mtrl_jax.models.transformer import packed_mask
from mtrl_jax.rollout.runner import build_policy
from mtrl_jax.training.batch import pack_for_update
from mtrl_jax.training.packing import Segment, pack
from mtrl_jax.training.update import ARRAYS, Updater, make_loss_fn, make_optimizer
from tests.test_trainer import TINY


def _groups(rng, n_groups, group_size, *, per_token_adv=False, turns=2, vocab=250, first=0):
    """Random groups: a common prompt per group, then per episode alternating sampled (mask 1)
    and environment (mask 0) spans."""
    segs = []
    for g in range(n_groups):
        prompt = rng.integers(1, vocab, rng.integers(6, 20)).astype(np.int32)
        for k in range(group_size):
            toks, mask = [prompt], [np.zeros(len(prompt), np.int8)]
            for t in range(turns):
                n = int(rng.integers(1, 7))
                toks.append(rng.integers(1, vocab, n).astype(np.int32))
                mask.append(np.ones(n, np.int8))
                if t < turns - 1:
                    n = int(rng.integers(1, 5))
                    toks.append(rng.integers(1, vocab, n).astype(np.int32))
                    mask.append(np.zeros(n, np.int8))
            toks, mask = np.concatenate(toks), np.concatenate(mask)
            blp = np.where(mask > 0, rng.uniform(-4, -0.1, len(toks)), 0).astype(np.float32)
            adv = (rng.normal(size=len(toks)).astype(np.float32) * mask if per_token_adv
                   else float(rng.normal()))
            segs.append(Segment(toks, mask, blp, adv, index=first + g * group_size + k))
    return segs


def _dense_reference(batch, segs):
    """``[R, L, L]`` from the episodes: a token of episode e at position p sees every token of
    the row that stands for position <= p of e (its own tokens, or the prefix it shares)."""
    rows, length = batch.shape
    # which episodes each packed token belongs to, and its position in them
    owners = [[set() for _ in range(length)] for _ in range(rows)]
    for r in range(rows):
        for j in range(length):
            sid = batch.segment_ids[r, j]
            if sid == 0:
                continue
            idx = batch.segment_index[r, j]
            if idx >= 0:
                owners[r][j] = {int(idx)}
            else:  # a shared prefix: every child that names it as parent
                kids = batch.segment_index[r][batch.parent_ids[r] == sid]
                owners[r][j] = {int(i) for i in kids}
    ref = np.zeros((rows, length, length), bool)
    for r, i, j in itertools.product(range(rows), range(length), range(length)):
        if j > i or not owners[r][i] or not owners[r][j]:
            continue
        # a query belongs to one episode unless it is a prefix token (then to all its children)
        ref[r, i, j] = owners[r][i] <= owners[r][j] or owners[r][j] >= owners[r][i]
    return ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_matches_dense_reference_and_rows_reproduce_the_episodes(seed):
    rng = np.random.default_rng(seed)
    segs = _groups(rng, 3, 4) + _groups(rng, 1, 1, first=12)  # a lone episode stays flat
    batch = pack(segs, (64, 128), multiple=1, min_shared=4)
    assert batch.num_tokens < batch.flat_tokens  # something was shared
    mask = np.asarray(packed_mask(jnp.asarray(batch.segment_ids), jnp.asarray(batch.parent_ids)))
    np.testing.assert_array_equal(mask, _dense_reference(batch, segs))
    # each episode, read back through its segment and its parent, is its own token sequence
    for r in range(batch.shape[0]):
        for sid in set(batch.segment_ids[r]) - {0}:
            at = batch.segment_ids[r] == sid
            idx = batch.segment_index[r][at][0]
            if idx < 0:
                continue
            parent = batch.parent_ids[r][at][0]
            pre = batch.tokens[r][batch.segment_ids[r] == parent] if parent else []
            seg = segs[idx]
            np.testing.assert_array_equal(np.r_[pre, batch.tokens[r][at]], seg.tokens)
            np.testing.assert_array_equal(batch.positions[r][at],
                                          np.arange(len(pre), len(seg.tokens)))
            np.testing.assert_array_equal(batch.loss_mask[r][at], seg.loss_mask[len(pre):])
            assert not seg.loss_mask[:len(pre) + 1].any()  # the first token never needs a logprob


def test_a_tree_longer_than_a_row_is_split_and_short_prefixes_stay_flat():
    rng = np.random.default_rng(5)
    segs = _groups(rng, 1, 8)
    longest = max(len(s.tokens) for s in segs)
    row = max(longest, 64)
    batch = pack(segs, (row,), multiple=1, min_shared=4)
    flat = pack(segs, (row,), multiple=1, min_shared=0)
    assert batch.num_tokens < flat.num_tokens == sum(len(s.tokens) for s in segs)
    assert int(batch.segment_ids.max()) >= 2
    # one copy of the prefix in every row that holds two or more of the group's episodes
    for r in range(batch.shape[0]):
        n_eps = len(set(batch.segment_index[r][batch.segment_index[r] >= 0]))
        has_prefix = bool(((batch.segment_index[r] == -1) & (batch.segment_ids[r] > 0)).any())
        assert has_prefix == (n_eps >= 2)
    # prompts shorter than min_shared: flat
    same = pack(segs, (row,), multiple=1, min_shared=10_000)
    assert same.num_tokens == flat.num_tokens and not same.parent_ids.any()


def _grads(c, graphdef, lora, base, batch, full=False):
    upd = Updater(graphdef, make_optimizer(c)[0], c)
    arrays = {k: jnp.asarray(getattr(batch, k)) for k in ARRAYS}
    args = (lora, base, arrays["tokens"], arrays["positions"], arrays["segment_ids"],
            arrays["parent_ids"])
    # old log-probs from a slightly different policy, so that ratios and clipping are live
    old_lora = jax.tree.map(lambda x: x * 0.9, lora)
    arrays["old_logprobs"] = upd.logprobs(old_lora, *args[1:])
    if c.algorithm.kl_coef > 0:
        arrays["ref_logprobs"] = upd.ref_logprobs(*args)
    loss_fn = make_loss_fn(c)

    def f(params):
        return loss_fn(nnx.merge(graphdef, *params), arrays)

    # full=True: with respect to every weight, the frozen base too (full fine-tuning)
    # one jitted program (eagerly, each of the ~600 primitives would compile on its own)
    (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))((lora, base))
    return float(loss), {k: float(v) for k, v in aux.items()}, grads if full else grads[0]


# (loss, aggregation, kl_coef, tis_mode, per-token advantages); three run by default, the rest
# (every other aggregation and loss) with -m slow
CASES = [
    ("ppo", "token_mean", 0.0, "none", False),
    ("cispo", "seq_mean_token_sum", 0.05, "truncate", False),
    ("ppo", "seq_mean_token_mean", 0.1, "mask", True),
    *[pytest.param("ppo", agg, 0.0, "none", False, marks=pytest.mark.slow)
      for agg in AGGREGATIONS if agg not in ("token_mean",)],
    pytest.param("gspo", "seq_mean_token_mean", 0.0, "truncate", False, marks=pytest.mark.slow),
    pytest.param("is", "seq_mean_token_sum_norm", 0.02, "truncate", True,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("loss,agg,kl,tis,per_token", CASES)
def test_loss_and_every_lora_gradient_equal_flat_packing(loss, agg, kl, tis, per_token):
    c = load_config(overrides=TINY + [
        "packing.row_lengths=[128]", f"algorithm.loss.name={loss}",
        f"algorithm.aggregation={agg}", "algorithm.norm_length=16", f"algorithm.kl_coef={kl}",
        f"algorithm.tis_mode={tis}", "algorithm.entropy_coef=0.01"])
    _, model = build_policy(c)
    graphdef, lora, base = split_lora(model)
    # LoRA B is zero at init: give every adapter weight a value so every gradient is live
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    lora = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys, strict=True)])
    rng = np.random.default_rng(zlib.crc32(f"{loss}{agg}{kl}{tis}".encode()))
    segs = _groups(rng, 3, 4, per_token_adv=per_token)
    flat = pack_for_update(segs, (128,), row_multiple=1, mini_batches=1)
    tree = pack_for_update(segs, (128,), row_multiple=1, mini_batches=1,
                           shared_prefix_min_tokens=4)
    assert tree.num_tokens < flat.num_tokens and tree.parent_ids.any()
    l_flat, aux_flat, g_flat = _grads(c, graphdef, lora, base, flat)
    l_tree, aux_tree, g_tree = _grads(c, graphdef, lora, base, tree)
    assert l_tree == pytest.approx(l_flat, rel=1e-5, abs=1e-7)
    for k in aux_flat:
        assert aux_tree[k] == pytest.approx(aux_flat[k], rel=1e-4, abs=1e-6), k
    flat_leaves = [np.asarray(x) for x in jax.tree.leaves(g_flat)]
    tree_leaves = [np.asarray(x) for x in jax.tree.leaves(g_tree)]
    assert len(flat_leaves) == len(tree_leaves) >= 4
    # the whole gradient to 1e-5 relative; each leaf to 5e-5 of its own norm (f32 summation
    # order: the smallest leaves, ~1e-3 of the largest, measured up to 1.2e-5)
    whole = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in flat_leaves))
    err = np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2)
                      for a, b in zip(flat_leaves, tree_leaves, strict=True)))
    assert err <= 1e-5 * whole, err / whole
    for a, b in zip(flat_leaves, tree_leaves, strict=True):
        assert np.linalg.norm(a) > 0
        assert np.linalg.norm(a - b) <= 5e-5 * np.linalg.norm(a), (
            np.linalg.norm(a - b) / np.linalg.norm(a))


def test_full_fine_tuning_gradients_equal_flat_packing():
    """Every weight's gradient (base and LoRA: full fine-tuning) equal between the packings."""
    c = load_config(overrides=TINY + ["packing.row_lengths=[128]", "algorithm.kl_coef=0.05"])
    _, model = build_policy(c)
    graphdef, lora, base = split_lora(model)
    segs = _groups(np.random.default_rng(11), 3, 4)
    flat = pack_for_update(segs, (128,), row_multiple=1, mini_batches=1)
    tree = pack_for_update(segs, (128,), row_multiple=1, mini_batches=1,
                           shared_prefix_min_tokens=4)
    assert tree.num_tokens < flat.num_tokens
    l_flat, _, g_flat = _grads(c, graphdef, lora, base, flat, full=True)
    l_tree, _, g_tree = _grads(c, graphdef, lora, base, tree, full=True)
    assert l_tree == pytest.approx(l_flat, rel=1e-5, abs=1e-7)
    a = [np.asarray(x, np.float64) for x in jax.tree.leaves(g_flat[1])]
    b = [np.asarray(x, np.float64) for x in jax.tree.leaves(g_tree[1])]
    assert len(a) >= 8 and sum(np.linalg.norm(x) > 0 for x in a) >= 8  # base weights are live
    whole = np.sqrt(sum(np.sum(x ** 2) for x in a))
    err = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True)))
    assert err <= 1e-5 * whole, err / whole
