"""``mtrl sweep-report S``: a sweep's cells side by side, with confidence intervals.

Per cell (over its finished seeds): the mean and 95% t-interval of the final held-out strict
success (``test/greedy/strict_success``) and of any other metric named; the compute each cell
used (wall-clock of its training steps, sampled and trained tokens: compute-matched columns).
Against a baseline cell (the first, or ``baseline``): the paired difference of held-out greedy
strict success, with a bootstrap interval over seeds and tasks (both resampled: the seeds the two
cells share, and the test tasks, the same tasks for both), and a plain verdict. Learning curves
with 95% bands over seeds (one PNG per curve metric). Writes ``<sweep>/report/report.html`` (a
table page with the curves), ``report.json`` and the PNGs; the text table is returned and
printed by the CLI.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtrl_jax.evaluation.metrics import mean_ci, t95

HEADLINE = "test/greedy/strict_success"
PAIRED = "greedy/strict_success"  # its per-task scores, paired by seed and task


def load_results(sweep) -> dict[str, dict[int, dict[str, Any]]]:
    """``cell label -> seed -> result`` for the children that finished (cells in grid order;
    a cell without any finished child is present and empty)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for cell in sweep.spec.cells():
        out[cell.label] = {}
        for seed in sweep.spec.seeds:
            path = sweep.result_path(cell, seed)
            if os.path.exists(path):
                with open(path) as f:
                    out[cell.label][seed] = json.load(f)
    return out


def paired_bootstrap(a: dict[int, Sequence[float]], b: dict[int, Sequence[float]], *,
                     n: int = 2000, seed: int = 0) -> tuple[float, float, float, int, int]:
    """``mean(b - a)`` over the seeds both have and their per-task scores, with a 95% interval
    from a two-level bootstrap: each replicate resamples the shared seeds and the tasks (one
    task resample for both cells: the comparison stays paired). Returns ``(diff, low, high,
    seeds, tasks)``."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two cells share no finished seed")
    A = np.asarray([a[s] for s in seeds], np.float64)
    B = np.asarray([b[s] for s in seeds], np.float64)
    if A.shape != B.shape or A.ndim != 2 or A.shape[1] == 0:
        raise ValueError(f"per-task scores of equal shape needed, got {A.shape} and {B.shape}")
    d = B - A
    s_n, t_n = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for i in range(n):  # [S, T] per replicate: small
        si = rng.integers(0, s_n, s_n)
        ti = rng.integers(0, t_n, t_n)
        means[i] = d[np.ix_(si, ti)].mean()
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi), s_n, t_n


def verdict(base: str, other: str, lo: float, hi: float, seeds: int, tasks: int) -> str:
    # with one shared seed the bootstrap resamples tasks only: the spread between training runs
    # is not in the interval, so a verdict says so
    note = " (1 seed: task noise only, the spread over seeds is unmeasured)" if seeds < 2 else ""
    if lo > 0:
        return f"{other} better than {base}{note}"
    if hi < 0:
        return f"{other} worse than {base}{note}"
    return f"no detectable difference at this n ({seeds} seeds x {tasks} tasks)"


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(values), "mean": float(np.mean(values)),
                           "values": [float(v) for v in values]}
    if len(values) >= 2:
        _, lo, hi = mean_ci(values)
        out.update(low=lo, high=hi, std=float(np.std(values, ddof=1)))
    return out


def _curve_band(results: dict[int, dict[str, Any]], metric: str):
    """Steps every seed logged ``metric`` at; the mean and 95% t-band over seeds."""
    series = [dict((int(s), v) for s, v in r.get("curves", {}).get(metric, []))
              for r in results.values()]
    series = [s for s in series if s]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    vals = np.asarray([[s[k] for k in steps] for s in series], np.float64)
    mean = vals.mean(axis=0)
    if len(series) >= 2:
        half = t95(len(series) - 1) * vals.std(axis=0, ddof=1) / np.sqrt(len(series))
    else:
        half = np.zeros_like(mean)
    return np.asarray(steps), mean, mean - half, mean + half, len(series)


def sweep_report(name_or_folder: str, *, root: str = "sweeps", metrics: Sequence[str] = (),
                 baseline: str | None = None, out_dir: str | None = None,
                 curves: Sequence[str] = ("rollout/reward/mean", "val/greedy/strict_success"),
                 bootstrap: int = 2000) -> dict[str, Any]:
    """Read a sweep's finished children; write the page, JSON and PNGs; return the report
    (its ``text`` is the table the CLI prints)."""
    from mtrl_jax.sweep import Sweep

    sweep = Sweep.open(name_or_folder, root=root, say=None)
    res = load_results(sweep)
    labels = list(res)
    if not any(res.values()):
        raise FileNotFoundError(f"sweep {sweep.spec.name}: no finished run yet (run mtrl sweep "
                                "with the same arguments first)")
    base = baseline or labels[0]
    if base not in res:
        raise ValueError(f"baseline {base!r} is not a cell of this sweep; cells: {labels}")
    names = [HEADLINE] + [m for m in metrics if m != HEADLINE]
    cells = {}
    for label, by_seed in res.items():
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for m in names:
            row[m] = _summary([r["test"][m] for r in by_seed.values()
                               if m in r.get("test", {})] or
                              [r["totals"][m] for r in by_seed.values()
                               if m in r.get("totals", {})])
        for t in ("wall_s", "sampled_tokens", "trained_tokens"):
            row[t] = _summary([r["totals"][t] for r in by_seed.values() if "totals" in r])
        cells[label] = row
    comparisons = {}
    base_scores = {s: r["per_task"][PAIRED] for s, r in res[base].items() if "per_task" in r}
    for label in labels:
        if label == base or not res[label] or not base_scores:
            continue
        other = {s: r["per_task"][PAIRED] for s, r in res[label].items() if "per_task" in r}
        try:
            d, lo, hi, ns, nt = paired_bootstrap(base_scores, other, n=bootstrap)
        except ValueError as e:
            comparisons[label] = {"error": str(e)}
            continue
        comparisons[label] = {"diff": d, "low": lo, "high": hi, "seeds": ns, "tasks": nt,
                              "verdict": verdict(base, label, lo, hi, ns, nt)}
    out_dir = out_dir or os.path.join(sweep.folder, "report")
    os.makedirs(out_dir, exist_ok=True)
    figures = []
    for metric in curves:
        path = os.path.join(out_dir, "curve_" + metric.replace("/", "_") + ".png")
        if _plot_curves(res, metric, path):
            figures.append((metric, os.path.basename(path)))
    report = {"sweep": sweep.spec.name, "folder": sweep.folder, "baseline": base,
              "metrics": names, "cells": cells, "comparisons": comparisons,
              "figures": [f for _, f in figures]}
    report["text"] = _text(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(_html(report, figures))
    report["html"] = os.path.join(out_dir, "report.html")
    return report


def _fmt(s: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    if not s.get("n"):
        return "-"
    if "low" in s:
        return (f"{s['mean'] * scale:.{digits}f} [{s['low'] * scale:.{digits}f}, "
                f"{s['high'] * scale:.{digits}f}]")
    return f"{s['mean'] * scale:.{digits}f} (1 seed)"


def _text(rep: dict[str, Any]) -> str:
    lines = [f"sweep {rep['sweep']} ({rep['folder']}): mean [95% t-interval over seeds]"]
    head = ["cell", "seeds"] + rep["metrics"] + ["train wall s", "sampled tok", "trained tok"]
    rows = []
    for label, c in rep["cells"].items():
        rows.append([label, str(len(c["seeds"]))] + [_fmt(c[m]) for m in rep["metrics"]]
                    + [_fmt(c["wall_s"], digits=0), _fmt(c["sampled_tokens"], digits=0),
                       _fmt(c["trained_tokens"], digits=0)])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))
    lines.append(f"paired against {rep['baseline']} (held-out greedy strict success, bootstrap "
                 "over seeds and tasks):")
    for label, c in rep["comparisons"].items():
        if "error" in c:
            lines.append(f"  {label}: {c['error']}")
        else:
            lines.append(f"  {label}: {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] -> "
                         f"{c['verdict']}")
    return "\n".join(lines)


def _plot_curves(res, metric: str, path: str) -> bool:
    from mtrl_jax.evaluation.report import _plt

    bands = {label: _curve_band(r, metric) for label, r in res.items() if r}
    bands = {k: v for k, v in bands.items() if v is not None}
    if not bands:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for label, (steps, mean, lo, hi, n) in bands.items():
        line, = ax.plot(steps, mean, marker="o" if len(steps) < 15 else None,
                        label=f"{label} (n={n})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_title(f"{metric}: mean and 95% band over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _html(rep: dict[str, Any], figures) -> str:
    from mtrl_jax.evaluation.report import FIGURES_LOADED

    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {e(rep['sweep'])}"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
             "text-align:right}td:first-child,th:first-child{text-align:left}</style></head>"
             "<body>", f"<h1>Sweep {e(rep['sweep'])}</h1>",
             f"<p><code>{e(rep['folder'])}</code>. Cells: mean [95% t-interval over seeds].</p>",
             "<table id='cells'><tr><th>cell</th><th>seeds</th>"
             + "".join(f"<th>{e(m)}</th>" for m in rep["metrics"])
             + "<th>train wall s</th><th>sampled tokens</th><th>trained tokens</th></tr>"]
    for label, c in rep["cells"].items():
        parts.append(f"<tr class='cell'><td>{e(label)}</td><td>{len(c['seeds'])}</td>"
                     + "".join(f"<td>{e(_fmt(c[m]))}</td>" for m in rep["metrics"])
                     + "".join(f"<td>{e(_fmt(c[t], digits=0))}</td>"
                               for t in ("wall_s", "sampled_tokens", "trained_tokens"))
                     + "</tr>")
    parts.append("</table>")
    parts.append(f"<h2>Paired against {e(rep['baseline'])}</h2><p>Held-out greedy strict "
                 "success, difference and 95% bootstrap interval over seeds and tasks.</p>"
                 "<table id='comparisons'><tr><th>cell</th><th>difference</th><th>95% CI</th>"
                 "<th>verdict</th></tr>")
    for label, c in rep["comparisons"].items():
        if "error" in c:
            parts.append(f"<tr><td>{e(label)}</td><td colspan='3'>{e(c['error'])}</td></tr>")
        else:
            parts.append(f"<tr class='comparison'><td>{e(label)}</td><td>{c['diff']:+.3f}</td>"
                         f"<td>{c['low']:+.3f} .. {c['high']:+.3f}</td>"
                         f"<td>{e(c['verdict'])}</td></tr>")
    parts.append("</table><h2>Learning curves</h2>")
    for metric, name in figures:
        parts.append(f"<h3>{e(metric)}</h3><img class='figure' src='{e(name)}' "
                     f"alt='{e(metric)}' width='750'>")
    parts.append(FIGURES_LOADED + "</body></html>")
    return "\n".join(parts)
