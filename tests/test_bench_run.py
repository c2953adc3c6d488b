"""benchmarks/run.py: the environment fingerprint, the baseline comparison's noise rule, the
README table's rewrite, and one real run of a seconds-long entry (no peer scripts needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "benchmarks", "run.py")

_spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
run = sys.modules["bench_run"] = importlib.util.module_from_spec(_spec)  # dataclasses need it
_spec.loader.exec_module(run)


def _result(ratios: dict[str, tuple[float, list[float], bool]], entry="e") -> dict:
    """A synthetic suite result: one entry with ``name -> (value, rounds, higher_is_better)``."""
    return {"fingerprint": {"commit": "abc", "date": "2026-12-02T00:00:00+00:00"},
            "entries": {entry: {"name": entry, "status": "ok", "what": "thing",
                                "display": "python benchmarks/x.py",
                                "ratios": {k: run.ratio(r, v, higher_is_better=up)
                                           for k, (v, r, up) in ratios.items()}}}}


def test_fingerprint_fields():
    fp = run.fingerprint()
    for key in ("commit", "dirty", "python", "packages", "cpu_model", "cpu_count", "xla_flags",
                "glibc_tunables", "platform", "date"):
        assert key in fp, key
    assert set(run.PACKAGES) <= set(fp["packages"])
    assert fp["packages"]["jax"]  # installed in the test environment
    assert fp["cpu_count"] == os.cpu_count()
    assert fp["commit"] is None or len(fp["commit"]) == 40
    json.dumps(fp)  # serialisable as is


def test_spread_is_half_range_over_median():
    assert run.spread([1.0]) == 0.0
    assert run.spread([0.9, 1.0, 1.1]) == pytest.approx(0.1)
    r = run.ratio([2.0, 3.0, 4.0])
    assert r["value"] == 3.0 and r["spread"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("new,verdict", [
    (1.0, "within noise"), (0.88, "within noise"), (1.14, "within noise"),
    (0.85, "regression"), (1.2, "improvement"),
])
def test_compare_floor(new, verdict):
    """Single values (no spread): the 15% floor decides, symmetric on a log scale."""
    c = run.compare_ratio(run.ratio([new]), run.ratio([1.0]))
    assert c["tolerance"] == run.FLOOR
    assert c["verdict"] == verdict


def test_compare_measured_noise_widens_tolerance():
    base = run.ratio([1.0, 1.0, 1.0])
    noisy = run.ratio([0.5, 0.8, 1.1])  # spread 0.3/0.8 = 37.5%
    c = run.compare_ratio(noisy, base)
    assert c["tolerance"] == pytest.approx(0.375)
    assert c["verdict"] == "within noise"  # 0.8 is -20%: inside the noise the run measured
    quiet = run.ratio([0.79, 0.8, 0.81])
    assert run.compare_ratio(quiet, base)["verdict"] == "regression"
    # the baseline's spread counts too
    assert run.compare_ratio(quiet, run.ratio([0.6, 1.0, 1.4]))["verdict"] == "within noise"


def test_compare_lower_is_better():
    base = run.ratio([2.0], higher_is_better=False)
    assert run.compare_ratio(run.ratio([3.0], higher_is_better=False), base)["verdict"] == \
        "regression"
    assert run.compare_ratio(run.ratio([1.5], higher_is_better=False), base)["verdict"] == \
        "improvement"


def test_compare_results():
    new = _result({"a": (0.5, [0.5, 0.5], True), "b": (1.0, [1.0], True),
                   "c": (2.0, [2.0], True)})
    old = _result({"a": (1.0, [1.0, 1.0], True), "b": (1.05, [1.05], True)})
    old["entries"]["gone"] = {"status": "ok", "ratios": {"x": run.ratio([1.0])}}
    cmp = run.compare(new, old)
    verdicts = {r["ratio"]: r["verdict"] for r in cmp["rows"]}
    assert verdicts == {"a": "regression", "b": "within noise", "c": "new"}
    assert cmp["regressions"] == 1 and cmp["baseline_commit"] == "abc"
    run.print_comparison(cmp)
    # a failed or skipped entry has no ratios: its baseline ratios are listed as not measured
    new["entries"]["e"] = {"status": "failed", "error": "x"}
    cmp = run.compare(new, old)
    assert {(r["ratio"], r["verdict"]) for r in cmp["rows"]} == {
        ("a", "not measured (failed)"), ("b", "not measured (failed)")}
    assert cmp["regressions"] == 0
    run.print_comparison(cmp)


def test_readme_rewrite_only_touches_the_block():
    text = (f"# T\n\nbefore\n\n{run.BEGIN}\nold table\n{run.END}\n\n| hand | table |\nafter\n")
    res = _result({"speed": (1.5, [1.4, 1.5, 1.6], True)})
    table = run.readme_table(res)
    assert "**1.50x** (1.40, 1.50, 1.60)" in table and "2026-12-02, abc" in table
    once = run.rewrite_readme(text, table)
    assert run.rewrite_readme(once, table) == once  # idempotent
    head, rest = once.split(run.BEGIN)
    block, tail = rest.split(run.END)
    assert head == "# T\n\nbefore\n\n"
    assert tail == "\n\n| hand | table |\nafter\n"
    assert block == "\n" + table + "\n" and "old table" not in once
    with pytest.raises(ValueError):
        run.rewrite_readme("no markers", table)


def test_readme_notes_entries_not_measured():
    res = _result({"speed": (1.5, [1.5], True)}, entry="sandbox")
    assert "Not measured in this run: `models_train`, `models_decode`" in run.readme_table(res)
    res["complete"] = False
    assert "Not measured in this run (interrupted): `models_train`" in run.readme_table(res)


def test_readme_rows_for_skipped_and_failed():
    res = _result({"speed": (1.5, [1.5], False)})
    res["entries"]["p"] = {"name": "p", "status": "skipped", "reason": "needs peers",
                           "what": "peer thing", "display": "python p.py"}
    res["entries"]["f"] = {"name": "f", "status": "failed", "error": "exit status 1",
                           "what": "broken", "display": "python f.py"}
    table = run.readme_table(res)
    assert "lower is better" in table
    assert "| peer thing | `python p.py` | skipped: needs peers |" in table
    assert "failed: exit status 1" in table


def test_registry():
    assert {e.name for e in run.SUITE if e.default} >= {"models_train", "models_decode",
                                                        "shared_prefix", "sandbox"}
    for e in run.SUITE:
        assert run.TMP in e.argv, e.name  # its JSON goes to the runner's temporary file
        assert os.path.exists(os.path.join(ROOT, e.argv[0])), e.name
        assert "{" not in e.display()
    assert "../shared/peers" in run.ENTRIES["models_train"].display()


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, RUN_PY, *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_end_to_end(tmp_path):
    """A real run of the seconds-long sandbox entry: the JSON and the baseline saved; runs
    compared with a doctored baseline flag regressions, fatal only with --fail-on-regression;
    the table of a temporary README is generated from the JSON."""
    out, base = tmp_path / "suite.json", tmp_path / "baseline.json"
    common = ["--only", "sandbox_quick", "--baseline", str(base), "--no-readme"]
    p = _run(tmp_path, *common, "--out", str(out), "--save-baseline")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing compared" in p.stdout
    res = json.loads(out.read_text())
    assert res["complete"] and res["fingerprint"]["cpu_count"] == os.cpu_count()
    e = res["entries"]["sandbox_quick"]
    assert e["status"] == "ok" and e["exit_status"] == 0 and e["wall_s"] > 0
    assert "benchmarks/sandbox_overhead.py" in e["command"]
    r = e["ratios"]["unisolated_vs_plain"]  # present with or without bubblewrap
    assert len(r["rounds"]) == 2 and r["value"] > 0 and not r["higher_is_better"]
    assert json.loads(base.read_text()) == res

    # a baseline 10x better than anything measurable: every ratio regressed
    doctored = json.loads(base.read_text())
    for x in doctored["entries"]["sandbox_quick"]["ratios"].values():
        x["value"] /= 10
        x["rounds"] = [v / 10 for v in x["rounds"]]
    base.write_text(json.dumps(doctored))
    out2 = tmp_path / "suite2.json"
    p = _run(tmp_path, *common, "--out", str(out2))
    assert p.returncode == 0, p.stdout + p.stderr  # flagged, but only fatal when asked
    assert "vs baseline" in p.stdout and "regression" in p.stdout
    cmp = json.loads(out2.read_text())["comparison"]
    assert {row["ratio"]: row["verdict"] for row in cmp["rows"]} == {
        k: "regression" for k in e["ratios"]}
    assert cmp["regressions"] == len(e["ratios"]) and cmp["baseline"] == str(base)
    p = _run(tmp_path, *common, "--out", str(out2), "--fail-on-regression")
    assert p.returncode == 1, p.stdout + p.stderr

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.BEGIN}\n{run.END}\nhand-written\n")
    p = _run(tmp_path, "--readme-only", "--from", str(out), "--readme", str(readme))
    assert p.returncode == 0, p.stdout + p.stderr
    text = readme.read_text()
    assert "sandbox_overhead.py --calls 3" in text and text.endswith(f"{run.END}\nhand-written\n")
    p = _run(tmp_path, "--readme-only", "--from", str(out), "--readme", str(readme))
    assert "unchanged" in p.stdout and readme.read_text() == text


def test_peer_entries_skip_without_peers(capsys):
    out = run.run_entry(run.ENTRIES["models_train"], None)
    assert out["status"] == "skipped" and "../shared/peers" in out["reason"]
    assert "skipped" in capsys.readouterr().out
