# %% [markdown]
# # A tour of the kernels: advantages, policy losses, pass@k and pass@k training
#
# Percent-format notebook: open it in Jupyter through jupytext (`jupytext --to ipynb` or the
# jupytext contents manager), or run it as a script: `python notebooks/kernels_tour.py`.
# Every number below is computed twice where it can be: by the jitted kernel in `mtrl_jax.kernels`
# and by a few lines of numpy written here from the definition; the `assert`s are the checks
# that CI runs (`tests/test_notebooks.py` executes this notebook cell by cell).

# %%
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.kernels import (
    ADVANTAGE_ESTIMATORS,
    LossConfig,
    PassKParams,
    PolicyLossInputs,
    TISParams,
    compute_advantages,
    pass_at_k,
    policy_loss,
)

# %% [markdown]
# ## 1. Advantages: one group of 8 rollouts of the same task, 2 of which succeed
# How much credit does each estimator give a success and a failure?

# %%
rewards = jnp.array([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
lengths = jnp.array([[120, 300, 80, 150, 90, 400, 60, 200]])

table = {}
for name in ADVANTAGE_ESTIMATORS.names():
    if ADVANTAGE_ESTIMATORS.get(name).level != "sequence":
        continue
    adv = np.asarray(compute_advantages(name, rewards, lengths=lengths))[0]
    table[name] = adv
for k in (2, 4, 8):
    table[f"grpo_passk k={k}"] = np.asarray(
        compute_advantages("grpo_passk", rewards, params=PassKParams(k=k)))[0]

print(f"{'estimator':24s} {'success':>9s} {'failure':>9s} {'sum':>9s}")
for name, adv in table.items():
    print(f"{name:24s} {adv[0]:9.3f} {adv[1]:9.3f} {adv.sum():9.3f}")

# %% [markdown]
# The numpy definitions: GRPO is `(r - mean) / (std + eps)` with the sample std; RLOO is each
# reward minus the mean of the *other* rewards of its group. Both sum to zero over the group.

# %%
r = np.asarray(rewards[0], np.float64)
grpo_ref = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
rloo_ref = r - (r.sum() - r) / (len(r) - 1)
assert np.allclose(table["group_based"], grpo_ref, atol=1e-5)
assert np.allclose(table["rloo"], rloo_ref, atol=1e-6)
assert abs(table["group_based"].sum()) < 1e-4 and abs(table["rloo"].sum()) < 1e-5
assert table["group_based"][0] > 0 > table["group_based"][1]

# %% [markdown]
# ## 2. pass@k training, checked by enumerating every subset
# `grpo_passk` (Chen et al., 2025) scores a sample by the normalised reward of the size-k
# subsets that contain it, a subset's reward being its best member's. The kernel uses a closed
# form over sorted rewards; here the same quantity by brute force over all C(n, k) subsets,
# for a group with graded rewards.

# %%
def passk_advantages_by_enumeration(rew, k, eps=1e-6):
    n = len(rew)
    subsets = list(itertools.combinations(range(n), k))
    best = np.array([max(rew[i] for i in s) for s in subsets])
    mu, sigma = best.mean(), best.std()
    return np.array([np.mean([(b - mu) / (sigma + eps)
                              for s, b in zip(subsets, best, strict=True) if i in s])
                      for i in range(n)])


graded = np.array([0.0, 0.25, 1.0, 0.0, 0.5, 0.0, 0.75, 0.0])
passk_rows = []
for k in (1, 2, 3, 4, 6):
    kernel = np.asarray(compute_advantages("grpo_passk", jnp.asarray(graded[None]),
                                           params=PassKParams(k=k)))[0]
    brute = passk_advantages_by_enumeration(graded, k)
    passk_rows.append((k, np.abs(kernel - brute).max()))
    print(f"k={k}: kernel {np.round(kernel, 3)}\n     brute  {np.round(brute, 3)}")
    assert np.allclose(kernel, brute, atol=1e-4), (k, kernel, brute)

# %% [markdown]
# As k grows, a failure is penalised less (some subset with it still succeeds) and the best
# sample keeps its credit: pass@k training explores. With k = n every subset is the whole group,
# so nothing is learned (all advantages 0).

# %%
worst = [float(np.asarray(compute_advantages("grpo_passk", rewards,
                                              params=PassKParams(k=k)))[0][1]) for k in (1, 2, 4)]
assert worst[0] < worst[1] < worst[2] < 0
assert np.allclose(table["grpo_passk k=8"], 0.0, atol=1e-5)

# %% [markdown]
# ## 3. The unbiased pass@k estimator
# From n samples with c successes, `pass_at_k(n, c, k) = 1 - C(n-c, k) / C(n, k)`: the share of
# size-k subsets with at least one success. Checked against that enumeration, and against a
# Monte-Carlo draw of k samples without replacement.

# %%
rng = np.random.default_rng(0)
n = 10
for c in (0, 1, 3, 9):
    outcomes = np.array([1] * c + [0] * (n - c))
    for k in (1, 2, 5):
        exact = np.mean([outcomes[list(s)].max() for s in itertools.combinations(range(n), k)])
        draws = np.array([outcomes[rng.choice(n, k, replace=False)].max() for _ in range(4000)])
        se = max(draws.std() / math.sqrt(len(draws)), 1e-3)
        est = pass_at_k(n, c, k)
        print(f"n={n} c={c} k={k}: estimator {est:.4f}  enumeration {exact:.4f}  "
              f"Monte Carlo {draws.mean():.4f} +- {se:.4f}")
        assert abs(est - exact) < 1e-12
        assert abs(est - draws.mean()) < 4 * se

# %% [markdown]
# ## 4. Policy losses: what each does to one token's gradient
# One token with advantage +1 or -1, seen at importance ratio `r = pi_theta / pi_old` from 0.5
# to 2 (off the clip boundaries, where the max of two equal terms splits its gradient). For each
# loss, the gradient of the loss with respect to the token's log-prob. The
# numpy references, written from the definitions, with each loss's default parameters (PPO:
# clip 0.2 both ways; GSPO: the paper's tiny sequence-level range, 1 - 3e-4 .. 1 + 4e-4; CISPO:
# MiniMax's weight clip to [0, 1.28], never zeroed; `is`: weight truncated at 2):
#
# - PPO: `-A r` where the clip is inactive, 0 where it binds (`r > 1.2` with `A > 0`,
#   `r < 0.8` with `A < 0`);
# - CISPO: `-A clip(r, 0, 1.28)` everywhere;
# - IS: `-A min(r, 2)`;
# - GSPO on a one-token sequence: PPO with GSPO's range.

# %%
def token_grad(loss_name, ratio, adv):
    old = jnp.full((1, 1), -1.0)

    def f(lp):
        inputs = PolicyLossInputs(logprobs=lp, old_logprobs=old,
                                  advantages=jnp.full((1, 1), adv),
                                  loss_mask=jnp.ones((1, 1), bool),
                                  segment_ids=jnp.ones((1, 1), jnp.int32))
        return policy_loss(loss_name, inputs, config=LossConfig(aggregation="token_mean"))[0]

    return float(jax.grad(f)(old + jnp.log(ratio))[0, 0])


def reference_grad(loss_name, r, a):
    if loss_name in ("ppo", "gspo"):
        lo, hi = (0.2, 0.2) if loss_name == "ppo" else (3e-4, 4e-4)
        binds = (a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo)
        return 0.0 if binds else -a * r
    if loss_name == "cispo":
        return -a * min(max(r, 0.0), 1.28)
    return -a * min(r, 2.0)


ratios = np.round(np.linspace(0.55, 1.95, 15), 3)  # off the clip boundaries (ties split)
grads = {}
for loss_name in ("ppo", "cispo", "is", "gspo"):
    for a in (1.0, -1.0):
        g = np.array([token_grad(loss_name, r, a) for r in ratios])
        ref = np.array([reference_grad(loss_name, r, a) for r in ratios])
        assert np.allclose(g, ref, atol=1e-5), (loss_name, a, g, ref)
        grads[(loss_name, a)] = g
print("ratio   " + " ".join(f"{r:6.2f}" for r in ratios))
for (loss_name, a), g in grads.items():
    print(f"{loss_name:5s} A={a:+.0f} " + " ".join(f"{x:6.2f}" for x in g))

# %% [markdown]
# PPO drops the token entirely once its ratio leaves the trust region in the helpful direction;
# CISPO keeps every token's gradient and only bounds its weight: this is why CISPO learns from
# the rare tokens that PPO clips away.

# %%
ppo_dropped = int((grads[("ppo", 1.0)] == 0).sum())
cispo_dropped = int((grads[("cispo", 1.0)] == 0).sum())
print(f"tokens with zero gradient (A=+1, {len(ratios)} ratios): ppo {ppo_dropped}, "
      f"cispo {cispo_dropped}")
assert ppo_dropped > 0 and cispo_dropped == 0

# %% [markdown]
# ## 5. Truncated importance sampling (TIS): the sampler-vs-trainer mismatch
# With behaviour log-probs `mu` from the sampler, every loss is multiplied by the stopped weight
# `min(pi_old / mu, cap)`. A token the sampler was much less likely to pick than the trainer
# (a stale or mismatched sampler) has its weight capped.

# %%
def tis_grad(behaviour_gap, cap=2.0):
    old = jnp.full((1, 1), -1.0)

    def f(lp):
        inputs = PolicyLossInputs(logprobs=lp, old_logprobs=old, advantages=jnp.ones((1, 1)),
                                  loss_mask=jnp.ones((1, 1), bool),
                                  segment_ids=jnp.ones((1, 1), jnp.int32),
                                  behaviour_logprobs=old - behaviour_gap)
        cfg = LossConfig(tis=TISParams(mode="truncate", cap=cap))
        return policy_loss("ppo", inputs, config=cfg)[0]

    return float(jax.grad(f)(old)[0, 0])


for gap in (0.0, 0.5, 2.0):
    g = tis_grad(gap)
    print(f"pi_old / mu = {math.exp(gap):5.2f}: gradient {g:+.3f} "
          f"(weight {min(math.exp(gap), 2.0):.2f})")
    assert abs(g + min(math.exp(gap), 2.0)) < 1e-5
