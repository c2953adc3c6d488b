"""``mtrl report``: a run with validation and an external evaluation becomes an HTML page whose
figures are all there -- rendered in headless Chromium (Debian's ``chromium``; CI installs it,
elsewhere the rendering test is skipped when it is missing)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator
from mtrl_jax.evaluation.report import build_report
from mtrl_jax.training.trainer import MultiTurnRLTrainer
from tests.async_envs import make_fields_env
from tests.test_evaluator import _tasks
from tests.test_trainer import TINY

FIGURES = ("curves.png", "completion.png", "fields.png", "budgets.png")


@pytest.fixture(scope="module")
def run_with_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("reportrun")
    t = MultiTurnRLTrainer(overrides=TINY + ["steps=4", f"output_dir={out}", "eval_interval=2"],
                           train_tasks=_tasks("train", 6), val_tasks=_tasks("val", 3),
                           make_env=make_fields_env, verbose=False)
    t.train()
    t.close()
    MultiTurnRLEvaluator(adapter=out / "adapter", overrides=TINY, tasks=_tasks("test", 4),
                         make_env=make_fields_env, samples_per_task=2, evaluate_base_model=True,
                         output_dir=out / "eval", verbose=False).evaluate()
    return out


def test_report_writes_every_figure(run_with_eval):
    path = build_report(str(run_with_eval))
    page = open(path).read()
    for name in FIGURES:
        assert (run_with_eval / "report" / name).stat().st_size > 1000
        assert f"src='{name}'" in page
    assert "External evaluation" in page and "Doctor" in page
    assert "class='missing'" not in page


def test_report_without_an_evaluation_says_what_to_run(run_with_eval, tmp_path):
    path = build_report(str(run_with_eval), eval_path=str(tmp_path / "none.json"),
                        out_dir=str(tmp_path / "r"))
    page = open(path).read()
    assert page.count("class='missing'") == 2 and "mtrl eval --run" in page
    assert "src='curves.png'" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run_with_eval, tmp_path):
    from mtrl_jax.cli import main

    assert main(["report", str(run_with_eval), "--out", str(tmp_path / "page")]) == 0
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
         f"file://{tmp_path / 'page' / 'report.html'}"],
        capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-figures="(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(1)) == len(FIGURES)  # every <img> loaded with a non-zero size
