# %% [markdown]
# # A sweep, read back from MLflow: final scores with confidence intervals, learning curves
# # with bands, paired comparisons
#
# Percent-format notebook (open in Jupyter through jupytext, or run as a script). It reads a
# sweep made by `mtrl sweep` (for example the study in README:
# `mtrl sweep --recipe configs/demo_cpu.yaml model.path=<warm base> --name staleness
# --grid async_config.max_steps_off_policy=0,1,2 --seeds 0-4`) from its MLflow store alone:
# the parent run, its nested child runs (one per cell and seed), their final held-out
# evaluation and their per-step metrics. Then it sets the numbers beside `mtrl sweep-report`'s,
# which reads the children's `result.json` files: the two must agree.
#
# Parameters (environment variables): `MTRL_NB_SWEEP` the sweep folder (default
# `sweeps/staleness`), `MTRL_NB_CURVE` the curve metric (default `rollout/reward/mean`),
# `MTRL_NB_BASELINE` the baseline cell (default: the sweep's first cell).

# %%
import json
import os

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import numpy as np
from mlflow.tracking import MlflowClient

from mtrl_jax.evaluation.metrics import mean_ci, t95
from mtrl_jax.evaluation.sweep_report import HEADLINE, sweep_report
from mtrl_jax.sweep import Sweep

SWEEP = os.environ.get("MTRL_NB_SWEEP", "sweeps/staleness")
CURVE = os.environ.get("MTRL_NB_CURVE", "rollout/reward/mean")
if not os.path.exists(os.path.join(SWEEP, "sweep.json")):
    raise FileNotFoundError(f"{SWEEP} is not a sweep folder: run `mtrl sweep ...` first, or set "
                            "MTRL_NB_SWEEP to one")
sweep = Sweep.open(SWEEP, say=None)
with open(os.path.join(sweep.folder, "sweep.json")) as f:
    state = json.load(f)
cells = [c.label for c in sweep.spec.cells()]
BASELINE = os.environ.get("MTRL_NB_BASELINE") or cells[0]
print(f"sweep {sweep.spec.name}: cells {cells}, seeds {sweep.spec.seeds}, "
      f"MLflow store {sweep.tracking_uri}")

# %% [markdown]
# ## The child runs in MLflow
# Each child is a run nested under the sweep's parent run (`mlflow.parentRunId`), tagged with
# its cell and seed.

# %%
client = MlflowClient(sweep.tracking_uri)
parent = client.get_run(state["parent_run_id"])
children = client.search_runs(
    [parent.info.experiment_id],
    filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
runs = {}  # (cell, seed) -> run
for r in children:
    key = (r.data.tags["mtrl.cell"], int(r.data.tags["mtrl.seed"]))
    # a child resumed after a crash logs into the run it started; keep the newest if several
    if key not in runs or r.info.start_time > runs[key].info.start_time:
        runs[key] = r
finished = {k: r for k, r in runs.items() if HEADLINE in r.data.metrics}
print(f"{len(runs)} child runs, {len(finished)} with a final held-out evaluation")
for (cell, seed), r in sorted(finished.items()):
    print(f"  {cell:40s} seed {seed}: {HEADLINE} = {r.data.metrics[HEADLINE]:.3f}  "
          f"({r.info.status})")

# %% [markdown]
# ## Final held-out strict success per cell: mean and 95% t-interval over seeds

# %%
final = {c: {s: r.data.metrics[HEADLINE] for (cc, s), r in finished.items() if cc == c}
         for c in cells}
summary = {}
for c in cells:
    vals = [final[c][s] for s in sorted(final[c])]
    if len(vals) >= 2:
        m, lo, hi = mean_ci(vals)
        summary[c] = dict(n=len(vals), mean=m, low=lo, high=hi, std=float(np.std(vals, ddof=1)))
        print(f"{c:40s} n={len(vals)}  {m:.3f}  [{lo:.3f}, {hi:.3f}]  sd {summary[c]['std']:.3f}")
    elif vals:
        summary[c] = dict(n=1, mean=vals[0])
        print(f"{c:40s} n=1  {vals[0]:.3f}  (one seed: no interval)")

# %% [markdown]
# ## Learning curves with 95% bands over seeds
# Every child's per-step history of the curve metric, from MLflow; the band is the t-interval
# over the seeds at each step that every seed logged.

# %%
curves = {}
for c in cells:
    series = {s: dict((m.step, m.value) for m in client.get_metric_history(r.info.run_id, CURVE))
              for (cc, s), r in finished.items() if cc == c}
    series = {s: v for s, v in series.items() if v}
    if not series:
        continue
    steps = sorted(set.intersection(*(set(v) for v in series.values())))
    vals = np.array([[series[s][k] for k in steps] for s in sorted(series)])
    mean = vals.mean(axis=0)
    half = (t95(len(vals) - 1) * vals.std(axis=0, ddof=1) / np.sqrt(len(vals))
            if len(vals) >= 2 else np.zeros_like(mean))
    curves[c] = dict(steps=np.array(steps), mean=mean, low=mean - half, high=mean + half,
                     n=len(vals), per_seed=series)

fig, ax = plt.subplots(figsize=(7, 4))
for c, cv in curves.items():
    ax.plot(cv["steps"], cv["mean"], label=f"{c} (n={cv['n']})")
    ax.fill_between(cv["steps"], cv["low"], cv["high"], alpha=0.2)
ax.set_xlabel("step")
ax.set_ylabel(CURVE)
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Paired comparisons against the baseline
# Seeds are paired: a cell's seed s and the baseline's seed s share the base model, the data
# splits and the task order. The difference per seed, its mean and t-interval (seeds only),
# then `mtrl sweep-report`'s bootstrap over seeds *and* test tasks, which also counts the
# tasks' noise and is the interval the report's verdict uses.

# %%
report = sweep_report(SWEEP, curves=(), bootstrap=2000)
paired = {}
for c in cells:
    if c == BASELINE:
        continue
    shared = sorted(set(final[c]) & set(final[BASELINE]))
    d = [final[c][s] - final[BASELINE][s] for s in shared]
    row = dict(seeds=len(shared), diff=float(np.mean(d)) if d else float("nan"))
    if len(d) >= 2:
        _, row["low"], row["high"] = mean_ci(d)
    comp = report["comparisons"].get(c, {})
    row.update(boot_low=comp.get("low"), boot_high=comp.get("high"), verdict=comp.get("verdict"))
    paired[c] = row
print(f"paired against {BASELINE}")
print(f"{'cell':40s} {'seeds':>5s} {'diff':>7s} {'t-interval (seeds)':>20s} "
      f"{'bootstrap (seeds x tasks)':>26s}  verdict")
for c, row in paired.items():
    t_iv = f"[{row['low']:+.3f}, {row['high']:+.3f}]" if "low" in row else "-"
    b_iv = (f"[{row['boot_low']:+.3f}, {row['boot_high']:+.3f}]"
            if row["boot_low"] is not None else "-")
    print(f"{c:40s} {row['seeds']:5d} {row['diff']:+7.3f} {t_iv:>20s} {b_iv:>26s}  "
          f"{row['verdict']}")

# %% [markdown]
# ## The two read-outs agree
# MLflow (this notebook) and the children's `result.json` (the report) hold the same numbers.

# %%
for c in cells:
    if c in summary:
        assert abs(summary[c]["mean"] - report["cells"][c][HEADLINE]["mean"]) < 1e-9, c
for c, row in paired.items():
    boot = report["comparisons"].get(c, {})
    if "diff" in boot:
        assert abs(boot["diff"] - row["diff"]) < 1e-9, c  # mean over tasks = the run's score
print("MLflow and result.json agree on", len(summary), "cells")
