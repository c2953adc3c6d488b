"""``mtrl report <run>``: one HTML page (plus its PNGs) that reads a run at a glance.

Figures: the training reward and the validation curves together; completion vs correctness on
the validation split; base vs fine-tuned per-field accuracy (from an ``mtrl eval --base``
result); the turn and token budget histograms; and excerpts of the trajectories where reward and
strict score disagree, with the MLflow run they are traced in. Sources: the run folder's
``mlflow.db`` and, when present, ``<run>/eval/eval_results.json`` (or ``--eval PATH``).
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

import numpy as np

from mtrl_jax.evaluation.doctor import History, _series, diagnose, load_history

#: marks on <body> how many images loaded (``data-figures``), read back in headless Chromium
FIGURES_LOADED = ("<script>window.addEventListener('load', () => { document.body.dataset"
                  ".figures = [...document.images].filter(i => i.complete && i.naturalWidth > 0)"
                  ".length; });</script>")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(h: History, path: str) -> bool:
    plt = _plt()
    s, r = _series(h, "rollout/reward/mean")
    if not len(r):
        return False
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(s, r, label="training reward (rollout/reward/mean)", color="tab:blue")
    for name, style, label in (("val/greedy/reward/mean", "--", "validation reward"),
                               ("val/greedy/strict_success", "-", "validation strict success"),
                               ("rollout/strict_success", ":", "training strict success")):
        vs, vv = _series(h, name)
        if len(vv):
            ax.plot(vs, vv, style, marker="o" if len(vv) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("reward and validation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _completion(h: History, path: str) -> bool:
    plt = _plt()
    s, c = _series(h, "val/greedy/completion_rate")
    s2, ok = _series(h, "val/greedy/strict_success")
    if not len(c) or not len(ok) or len(s) != len(s2):
        return False
    fig, ax = plt.subplots(figsize=(7, 3.2))
    correct = np.minimum(ok, c)
    ax.bar(s, correct, width=max(1.0, np.ptp(s) / 30), label="completed and correct",
           color="tab:green")
    ax.bar(s, c - correct, bottom=correct, width=max(1.0, np.ptp(s) / 30),
           label="completed, wrong", color="tab:orange")
    ax.bar(s, 1 - c, bottom=c, width=max(1.0, np.ptp(s) / 30), label="no final answer",
           color="tab:gray")
    ax.set_xlabel("step")
    ax.set_ylabel("share of validation episodes")
    ax.legend(fontsize=8)
    ax.set_title("completion vs correctness (validation, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _fields(ev: dict[str, Any], path: str) -> bool:
    plt = _plt()
    models = list(ev.get("models", {}))
    fields = sorted({k for m in models for k in ev["models"][m] if k.startswith("greedy/field/")})
    if not models or not fields:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(fields))
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar(x + i * w, [ev["models"][m].get(f, 0.0) for f in fields], w, label=m)
    ax.set_xticks(x + w * (len(models) - 1) / 2, [f.split("/", 2)[2] for f in fields])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (greedy)")
    ax.legend(fontsize=8)
    ax.set_title("per-field accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _budgets(ev: dict[str, Any], path: str) -> bool:
    plt = _plt()
    eps = ev.get("episodes", {})
    if not eps:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for m, e in eps.items():
        a1.hist(e["turns"], bins=np.arange(0, e["max_turns"] + 2) - 0.5, alpha=0.6, label=m)
        a2.hist(e["sampled_tokens"], bins=20, alpha=0.6, label=m)
    first = next(iter(eps.values()))
    a1.axvline(first["max_turns"], color="k", ls="--", lw=1)
    a1.set_title(f"turns per episode (budget {first['max_turns']})")
    a2.set_title("sampled tokens per episode")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def build_report(run: str, *, eval_path: str | None = None, out_dir: str | None = None,
                 tracking_uri: str | None = None) -> str:
    """Write ``<out_dir>/report.html`` (default ``<run>/report``) and its PNGs; returns the
    HTML path."""
    history, run_id = load_history(run, tracking_uri)
    out_dir = out_dir or os.path.join(run, "report")
    os.makedirs(out_dir, exist_ok=True)
    eval_path = eval_path or os.path.join(run, "eval", "eval_results.json")
    ev = None
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            ev = json.load(f)
    figs = []
    for name, title, fn, src in (
            ("curves.png", "Reward and validation", _curves, history),
            ("completion.png", "Completion vs correctness", _completion, history),
            ("fields.png", "Base vs fine-tuned, per field", _fields, ev),
            ("budgets.png", "Turn and token budgets", _budgets, ev)):
        ok = src is not None and fn(src, os.path.join(out_dir, name))
        figs.append((name, title, ok))
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mtrl report {e(run_id)}"
             "</title><style>body{font-family:sans-serif;max-width:900px;margin:auto}"
             "pre{background:#f4f4f4;padding:6px;white-space:pre-wrap}"
             "td,th{padding:2px 8px;text-align:right}</style></head><body>",
             f"<h1>Run {e(os.path.basename(os.path.abspath(run)))}</h1>",
             f"<p>MLflow run <code>{e(run_id)}</code> in <code>{e(run)}</code>; "
             f"{len(history)} metrics.</p>"]
    findings = diagnose(history)
    parts.append("<h2>Doctor</h2>" + ("<p>no known failure pattern found</p>" if not findings
                                      else "<ul>" + "".join(
                                          f"<li><b>{e(f.name)}</b>: {e(f.seen)}. First change: "
                                          f"{e(f.first_change)}. Confirm: {e(f.confirm)}</li>"
                                          for f in findings) + "</ul>"))
    for name, title, ok in figs:
        parts.append(f"<h2>{e(title)}</h2>")
        if ok:
            parts.append(f"<img class='figure' src='{name}' alt='{e(title)}' width='700'>")
        else:
            hint = ("run <code>mtrl eval --run RUN --base --output-dir RUN/eval</code> first"
                    if name in ("fields.png", "budgets.png") else "no data for this figure")
            parts.append(f"<p class='missing'>{hint}</p>")
    if ev is not None:
        models = list(ev["models"])
        rows = ["greedy/strict_success", "sampled/strict_success", "strict_pass_k_1",
                "greedy/reward/mean", "greedy/field_acc", "greedy/completion_rate",
                "greedy/max_turns_frac", "greedy/truncated_frac", "greedy/format_compliance"]
        parts.append("<h2>External evaluation</h2><table><tr><th>metric</th>" +
                     "".join(f"<th>{e(m)}</th>" for m in models) + "</tr>")
        for r in rows:
            if any(r in ev["models"][m] for m in models):
                parts.append(f"<tr><td>{e(r)}</td>" + "".join(
                    f"<td>{ev['models'][m].get(r, float('nan')):.3f}</td>" for m in models)
                    + "</tr>")
        parts.append("</table>")
        for metric, d in ev.get("diff", {}).items():
            parts.append(f"<p>diff {e(metric)}: {d['diff']:+.3f} (95% CI {d['ci95'][0]:+.3f}"
                         f" .. {d['ci95'][1]:+.3f})</p>")
        dis = [(m, x) for m, xs in ev.get("disagreements", {}).items() for x in xs]
        parts.append(f"<h2>Reward vs strict disagreements ({len(dis)})</h2>")
        parts.append(f"<p>All are MLflow traces of the evaluation run ({e(ev.get('mlflow') or '')})"
                     f"; training-time ones are traces of run {e(run_id)} (kind "
                     "*_disagreement).</p>")
        for m, x in dis[:20]:
            parts.append(f"<div class='disagreement'><b>{e(m)}</b> task {e(x['task_id'])}: "
                         f"reward {x['reward']:.3f}, strict {x['strict']}"
                         f"<pre>{e(x['final_text'])}</pre></div>")
    parts.append(FIGURES_LOADED + "</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
