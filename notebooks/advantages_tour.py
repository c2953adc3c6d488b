# %% [markdown]
# # A tour of the advantage estimators
#
# Percent-format notebook (open in Jupyter with jupytext, or run as a script:
# `python notebooks/advantages_tour.py`). One group of 8 rollouts of the same task, 2 of which
# succeed; how much credit does each estimator give a success and a failure?

# %%
import jax.numpy as jnp
import numpy as np

from mtrl_jax.kernels import ADVANTAGE_ESTIMATORS, PassKParams, compute_advantages, pass_at_k

rewards = jnp.array([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
lengths = jnp.array([[120, 300, 80, 150, 90, 400, 60, 200]])

rows = {}
for name in ADVANTAGE_ESTIMATORS:
    if ADVANTAGE_ESTIMATORS.get(name).level != "sequence":
        continue
    adv = np.asarray(compute_advantages(name, rewards, lengths=lengths))[0]
    rows[name] = (adv[0], adv[1])
for k in (2, 4, 8):
    adv = np.asarray(compute_advantages("grpo_passk", rewards, params=PassKParams(k=k)))[0]
    rows[f"grpo_passk k={k}"] = (adv[0], adv[1])

print(f"{'estimator':24s} {'success':>9s} {'failure':>9s}")
for name, (pos, neg) in rows.items():
    print(f"{name:24s} {pos:9.3f} {neg:9.3f}")

# %% [markdown]
# pass@k training shrinks the penalty of a failure as k grows: with k = 8 = n every subset is the
# whole group, so nothing is learned. The unbiased pass@k of this group:

# %%
for k in (1, 2, 4, 8):
    print(f"pass@{k} = {pass_at_k(8, 2, k):.3f}")
