"""mtrl sweep and sweep-report: a 2-cell x 2-seed x 2-step sweep, its resume, a failed child,
the MLflow parent/child runs and the report (table, paired comparison, curves, page)."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from mtrl_jax.evaluation.sweep_report import paired_bootstrap, sweep_report, verdict
from mtrl_jax.sweep import Sweep, SweepError, SweepSpec, parse_grid, parse_seeds
from tests.notebook_runner import run_notebook

TINY = [
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, "
    "num_kv_heads: 1, head_dim: 16, tie_word_embeddings: true}",
    "lora.lora_rank=4", "data.task=math:arith", "data.n_train=16", "data.n_val=2",
    "data.system_prompt=none",
    "data.n_test=6", "rollout.batch_size=2", "rollout.group_size=2", "rollout.max_turns=1",
    "rollout.sampling_max_tokens=8", "rollout.max_context_tokens=1024",  # ~620-byte prompts
    "val_sampling_params.sampling_max_tokens=8", "val_sampling_params.num_samples=0",
    "packing.row_lengths=[1024]", "steps=2", "eval_interval=0", "checkpoint_interval=1",
]


def test_seeds_and_grid_parse():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-1,5") == [0, 1, 5]
    for bad in ("3-1", "a", "1,1", ""):
        with pytest.raises(SweepError):
            parse_seeds(bad)
    g = parse_grid(["algorithm.loss.name=ppo,cispo", "packing.row_lengths=[384,512],[512]"])
    assert g == {"algorithm.loss.name": ["ppo", "cispo"],
                 "packing.row_lengths": ["[384,512]", "[512]"]}
    for bad in (["x"], ["a=1,1"], ["a=1", "a=2"], ["a="]):
        with pytest.raises(SweepError):
            parse_grid(bad)
    spec = SweepSpec("s", None, g, "0-1")
    assert [c.label for c in spec.cells()] == [
        "algorithm.loss.name=ppo packing.row_lengths=[384,512]",
        "algorithm.loss.name=ppo packing.row_lengths=[512]",
        "algorithm.loss.name=cispo packing.row_lengths=[384,512]",
        "algorithm.loss.name=cispo packing.row_lengths=[512]"]
    assert len({c.folder for c in spec.cells()}) == 4
    with pytest.raises(SweepError, match="seed is set by the sweep"):
        SweepSpec("s", None, {"seed": ["1", "2"]}, "0")


def test_children_start_with_the_shared_compile_cache_and_the_fast_malloc(tmp_path, monkeypatch):
    from mtrl_jax import runtime

    monkeypatch.setattr(runtime, "_thp_available", lambda: True)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    monkeypatch.delenv("MTRL_NO_REEXEC", raising=False)
    sw = Sweep(SweepSpec("e", None, {}, "0"), root=str(tmp_path), say=None)
    env = sw._child_env()
    assert env["JAX_COMPILATION_CACHE_DIR"] == os.path.join(sw.folder, ".jax_cache")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")  # the user's own wins
    monkeypatch.setenv("MTRL_NO_REEXEC", "1")
    env = sw._child_env()
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/mine"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_paired_bootstrap_and_verdict():
    rng = np.random.default_rng(0)
    a = {s: (rng.random(200) < 0.3).astype(float) for s in range(5)}
    better = {s: np.maximum(a[s], (rng.random(200) < 0.3)) for s in range(5)}
    d, lo, hi, ns, nt = paired_bootstrap(a, better)
    assert (ns, nt) == (5, 200) and 0 < lo < d < hi
    assert verdict("A", "B", lo, hi, ns, nt) == "B better than A"
    same = {s: a[s][rng.permutation(200)] for s in range(5)}
    d, lo, hi, *_ = paired_bootstrap(a, same)
    assert lo < 0 < hi
    assert verdict("A", "B", lo, hi, 5, 200).startswith("no detectable difference")
    assert verdict("A", "B", -0.3, -0.1, 5, 200) == "B worse than A"
    assert verdict("A", "B", -0.3, -0.1, 1, 200).startswith("B worse than A (1 seed: task noise")
    with pytest.raises(ValueError, match="share no finished seed"):
        paired_bootstrap({0: [1.0]}, {1: [1.0]})


def test_a_sweep_runs_resumes_and_reports(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    root = str(tmp_path / "sweeps")
    grid = {"algorithm.loss.name": ["ppo", "cispo"]}
    sw = Sweep(SweepSpec("ab", None, grid, "0-1", overrides=TINY), root=root)
    first = sw.run(parallel=2)
    assert len(first["done"]) == 4 and not first["failed"]
    # the same command again: the finished runs are skipped
    second = sw.run(parallel=2)
    assert len(second["skipped"]) == 4 and not second["done"]
    # an interrupted run (checkpoints, no result) resumes from its checkpoint
    cell = sw.spec.cells()[0]
    os.remove(sw.result_path(cell, 1))
    assert sw.status()[f"{cell.label} / seed 1"] == "partial"
    third = sw.run()
    assert third["done"] == [f"{cell.label} / seed 1"] and len(third["skipped"]) == 3
    with open(os.path.join(sw.child_dir(cell, 1), "child.log")) as f:
        assert "resumed from step 2" in f.read()
    # another design under the same name is refused
    with pytest.raises(SweepError, match="another grid"):
        Sweep(SweepSpec("ab", None, {"algorithm.loss.name": ["is"]}, "0", overrides=TINY),
              root=root).run()

    # MLflow: one parent, four nested children with their cell and seed
    with open(os.path.join(sw.folder, "sweep.json")) as f:
        state = json.load(f)
    client = MlflowClient(sw.tracking_uri)
    exp = client.get_experiment_by_name("sweep/ab")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == state["parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == state["parent_run_id"]]
    assert len(parent) == 1 and parent[0].data.params["grid.algorithm.loss.name"] == "ppo,cispo"
    assert parent[0].info.status == "FINISHED"
    assert sorted((r.data.tags["mtrl.cell"], r.data.tags["mtrl.seed"]) for r in children) == \
        sorted((c.label, str(s)) for c in sw.spec.cells() for s in (0, 1))
    assert all(r.data.params["algorithm.loss.name"] == r.data.tags["grid.algorithm.loss.name"]
               for r in children)

    # the report: each cell over its 2 seeds, the paired comparison, curves, the page
    rep = sweep_report("ab", root=root, metrics=["test/greedy/reward/mean"])
    assert set(rep["cells"]) == {c.label for c in sw.spec.cells()}
    for c in rep["cells"].values():
        assert c["seeds"] == [0, 1] and c["test/greedy/strict_success"]["n"] == 2
        assert "low" in c["test/greedy/reward/mean"]
        # (a random model may score 0 on every episode: no advantage, nothing trained)
        assert c["trained_tokens"]["n"] == 2 and c["sampled_tokens"]["mean"] > 0
        assert c["wall_s"]["mean"] > 0
    (label, comp), = rep["comparisons"].items()
    assert label == "algorithm.loss.name=cispo" and comp["seeds"] == 2 and comp["tasks"] == 6
    assert comp["low"] <= comp["diff"] <= comp["high"] and "verdict" in comp
    # the reported figure is the children's own evaluation, averaged
    vals = []
    for s in (0, 1):
        with open(sw.result_path(cell, s)) as f:
            vals.append(json.load(f)["test"]["test/greedy/reward/mean"])
    assert rep["cells"][cell.label]["test/greedy/reward/mean"]["mean"] == \
        pytest.approx(np.mean(vals))
    assert rep["figures"] and all(os.path.getsize(os.path.join(sw.folder, "report", f)) > 1000
                                  for f in rep["figures"])
    from mtrl_jax.cli import main

    assert main(["sweep-report", "ab", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "paired against algorithm.loss.name=ppo" in out and "cispo" in out
    if shutil.which("chromium"):
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
             f"file://{rep['html']}"], capture_output=True, text=True, timeout=120).stdout
        m = re.search(r'data-figures="(\d+)"', dom)
        assert m and int(m.group(1)) == len(rep["figures"]), dom[:300]
        assert dom.count("class=\"cell\"") == 2 and dom.count("class=\"comparison\"") == 1
    elif os.environ.get("CI"):
        pytest.fail("chromium is not installed (CI installs it)")

    # the sweep notebook reads the same sweep back from MLflow alone (and checks itself against
    # the report inside); here its numbers against the children's own files
    ns = run_notebook("sweep_analysis.py", {"MTRL_NB_SWEEP": sw.folder,
                                            "MTRL_NB_CURVE": "rollout/reward/mean"})
    assert set(ns["summary"]) == {c.label for c in sw.spec.cells()}
    assert all(v["n"] == 2 and v["low"] <= v["mean"] <= v["high"] for v in ns["summary"].values())
    for c in sw.spec.cells():
        for s in (0, 1):
            with open(sw.result_path(c, s)) as f:
                res = json.load(f)
            assert ns["final"][c.label][s] == res["test"]["test/greedy/strict_success"]
            assert sorted(ns["curves"][c.label]["per_seed"][s].items()) == \
                [tuple(x) for x in res["curves"]["rollout/reward/mean"]]
        assert list(ns["curves"][c.label]["steps"]) == [1, 2]
    (label, row), = ns["paired"].items()
    assert label == "algorithm.loss.name=cispo" and row["seeds"] == 2
    assert row["verdict"] == rep["comparisons"][label]["verdict"]


@pytest.mark.slow  # ~60 s in CI (2 child processes); run with -m slow
def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path):
    from mtrl_jax.cli import main

    root = str(tmp_path / "sweeps")
    over = [o for o in TINY if not o.startswith("steps=")] + ["steps=1"]
    # a model folder that does not exist passes the config check and fails in its run
    rc = main(["sweep", "--name", "f", "--root", root, "--grid",
               "model.path=/no/such/model,null", "--seeds", "0", "--no-eval", *over])
    assert rc == 1
    sw = Sweep.open("f", root=root, say=None)
    st = sw.status()
    assert st["model.path=null / seed 0"] == "done"
    assert st["model.path=/no/such/model / seed 0"] == "pending"
    with open(os.path.join(sw.child_dir(sw.spec.cells()[0], 0), "child.log")) as f:
        assert "/no/such/model" in f.read()
    # a bad value is refused before anything runs
    assert main(["sweep", "--name", "g", "--root", root, "--grid",
                 "rollout.group_size=0,2", *over]) == 2
    assert not os.path.exists(os.path.join(root, "g"))
