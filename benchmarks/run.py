"""The benchmark suite: side-by-side ratios, an environment fingerprint, a baseline comparison.

    python benchmarks/run.py                      # the default suite (~15-20 min on 2 cores)
    python benchmarks/run.py --list               # the entries, (*) = in the default suite
    python benchmarks/run.py --only shared_prefix,sandbox
    python benchmarks/run.py --save-baseline      # also copy the result to the baseline
    python benchmarks/run.py --readme-only [--from FILE]   # rewrite README's table only

Each entry runs one benchmark script of this folder in a subprocess (``sys.executable``, from
the repository root, with ``--json``/``--out`` to a temporary file) and reads **ratios** from
its JSON: ours vs the PyTorch peer (``models_train``, ``models_decode``; they need the peer
scripts, ``--peers``, default ``../shared/peers`` beside the clone, and are skipped with a
message without them), a group's shared prompt vs flat (``shared_prefix``, ``rl_step``), the
isolated sandbox vs the plain interpreter (``sandbox``). Both sides of a ratio are measured in
the same run, alternated, so a slow spell of the machine hits both: only ratios are compared,
never absolute times (those are recorded under ``info``, for reading).

Each ratio keeps its per-round values: the benchmark's own rounds (alternations of the two
sides), or, for a benchmark without rounds, one value per run of it (``repeat`` runs).

Output (``--out``, default ``benchmarks/results/suite.json``): ``fingerprint`` (git commit and
whether the tree had local changes, Python, package versions, CPU model, core count, XLA_FLAGS,
GLIBC_TUNABLES, platform, load average, date) and per entry its command, exit status, wall
seconds, ratios with rounds; a failed entry is recorded (with the tail of its output) and the
others go on. The file is rewritten after every entry (``"complete": false`` until the end), so an
interrupted suite keeps what it measured.

Baseline comparison (``--baseline``, default ``benchmarks/results/baseline.json``, when it
exists), for every ratio present in both runs. The rule:

- a run's *spread* of a ratio is half the range of its per-round values over their median
  (0 with a single value): the noise that run measured;
- the tolerance is ``max(FLOOR, spread_new, spread_baseline)`` with ``FLOOR = 0.15`` (this VM's
  CPU steal moves single ratios by +-15%);
- ``change = new / baseline - 1``, signed so that positive is better (for a ratio where lower is
  better, such as the sandbox's overhead, ``baseline / new - 1``);
- ``regression`` when the better-signed ratio ``new/baseline`` (or its inverse) is below
  ``1 / (1 + tolerance)``, ``improvement`` when above ``1 + tolerance``, else ``within noise``
  (symmetric on a log scale).

The verdicts are printed and stored in the output under ``comparison``. The exit status is 1
when an entry failed, or, with ``--fail-on-regression``, when a ratio regressed; else 0.

README: the table between ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->`` in
README.md is generated from the output file: after a run of the whole default suite (in any
order, ``--only`` included; not with ``--no-readme``), or with ``--readme-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("benchmarks", "results", "suite.json")
DEFAULT_BASELINE = os.path.join("benchmarks", "results", "baseline.json")
DEFAULT_PEERS = os.path.join("..", "shared", "peers")
README = "README.md"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
#: the smallest relative change that counts as a regression or an improvement
FLOOR = 0.15
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft")
TMP = "{tmp}"  # stands for the entry's temporary JSON path in an argv
PEERS = "{peers}"  # stands for the peer scripts' folder


# --- ratios -------------------------------------------------------------------------------------

def ratio(rounds: list[float], value: float | None = None, *, higher_is_better: bool = True,
          label: str = "") -> dict:
    """A ratio with its per-round values; ``value`` defaults to their median."""
    rounds = [float(x) for x in rounds if x is not None]
    if value is None:
        value = statistics.median(rounds)
    return dict(value=float(value), rounds=rounds, higher_is_better=higher_is_better,
                label=label, spread=spread(rounds, value))


def spread(rounds: list[float], value: float | None = None) -> float:
    """Half the range of the per-round values over their median (0 with fewer than 2)."""
    if len(rounds) < 2:
        return 0.0
    mid = value if value else statistics.median(rounds)
    return (max(rounds) - min(rounds)) / 2 / abs(mid) if mid else 0.0


def _per_round(times: list[float], rounds: int) -> list[float]:
    """Medians of ``times`` cut into ``rounds`` consecutive equal chunks."""
    n = len(times) // max(rounds, 1)
    return [statistics.median(times[i * n:(i + 1) * n]) for i in range(rounds)] if n else []


def parse_models(name: str, speed: str, label: str) -> Callable[[list[dict]], tuple[dict, dict]]:
    def parse(recs: list[dict]) -> tuple[dict, dict]:
        rec = recs[0]
        r = rec[name]
        ratios = {"ours_vs_peer": ratio([x["ratio"] for x in r["rounds"]], r["ratio_vs_peer"],
                                        label=label)}
        info = dict(ours=[x["ours"] for x in r["rounds"]], peer=[x["peer"] for x in r["rounds"]],
                    unit=speed, matmul_peak_gflops=rec.get("matmul_peak_gflops"))
        if name == "train":
            info["mfu"] = r.get("mfu")
        else:
            info["end_to_end_ratio_vs_peer"] = r.get("end_to_end_ratio_vs_peer")
        return ratios, info
    return parse


def parse_long_cache(recs: list[dict]) -> tuple[dict, dict]:
    r = recs[0]["decode_long_cache"]
    rounds = r["rounds"]
    ratios = {f"{k}_vs_whole_cache": ratio([e[k] / e["xla_whole_cache"] for e in rounds],
                                           r[f"{k}_vs_whole_cache"],
                                           label=f"decode tokens/s, {k} / XLA over the whole cache")
              for k in ("kernel", "xla_windowed")}
    return ratios, dict(rounds_tokens_per_s=rounds, cache_len=r["cache_len"])


def parse_shared_prefix(recs: list[dict]) -> tuple[dict, dict]:
    rec = recs[0]
    n = rec["args"]["rounds"]
    ratios, info = {}, {}
    if "train" in rec:
        a = rec["train"]["arms"]
        per = [f / s for f, s in zip(_per_round(a["flat"]["times"], n),
                                     _per_round(a["shared"]["times"], n), strict=True)]
        ratios["train"] = ratio(per, rec["train"]["speedup"],
                                label="LoRA step time, flat / shared packing")
        info["train"] = dict(flat_s=a["flat"]["step_s"], shared_s=a["shared"]["step_s"],
                             predicted_speedup=rec["train"]["predicted_speedup"],
                             grad_rel_error=rec["train"]["grad_rel_error"])
    if "prefill" in rec:
        t = rec["prefill"]["times"]
        per = [f / s for f, s in zip(_per_round(t["flat"], n), _per_round(t["shared"], n),
                                     strict=True)]
        ratios["prefill"] = ratio(per, rec["prefill"]["speedup"],
                                  label="prompt prefill time, flat / shared")
        info["prefill"] = dict(flat_s=rec["prefill"]["flat_s"],
                               shared_s=rec["prefill"]["shared_s"])
    return ratios, info


def parse_rl_step(recs: list[dict]) -> tuple[dict, dict]:
    rec = recs[0]
    shared, flat = (rec["steps"][k] for k in rec["arms"])
    later = list(zip(shared, flat, strict=True))[1:]  # step 1 compiles
    ratios = {"step": ratio([f["step_s"] / s["step_s"] for s, f in later],
                            rec["summary"]["speedup"],
                            label="RL step time (steps 2..N), flat / shared"),
              "step_without_compile": ratio(
                  [(f["step_s"] - f["compile_s"]) / (s["step_s"] - s["compile_s"])
                   for s, f in later], rec["summary"]["speedup_without_compile"],
                  label="the same without XLA compile time")}
    info = dict(arms=rec["summary"]["arms"], same_step1_episodes=rec["same_step1_episodes"])
    return ratios, info


def parse_sandbox(recs: list[dict]) -> tuple[dict, dict]:
    """One value per run: the variant's median over the plain interpreter's, in that run."""
    rows = [{r["variant"]: r for r in rec["rows"]} for rec in recs]
    ratios = {}
    for key, variant in (("isolated_vs_plain", "run_python isolated"),
                         ("unisolated_vs_plain", "run_python unisolated")):
        if all(variant in r for r in rows):
            ratios[key] = ratio([r[variant]["x_plain"] for r in rows], higher_is_better=False,
                                label=f"ms per trivial call, {variant} / plain interpreter")
    info = dict(median_ms={v: [r[v]["median_ms"] for r in rows] for v in rows[0]},
                sandbox=recs[0].get("bwrap"))
    return ratios, info


# --- the registry -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    argv: list[str]  # after ``python``; TMP and PEERS are filled in
    parse: Callable[[list[dict]], tuple[dict, dict]]
    what: str  # the README row's first column
    default: bool = True  # in the default suite
    needs_peers: bool = False
    repeat: int = 1  # runs of the command (benchmarks without rounds of their own)
    timeout_s: float = 3600.0

    def command(self, tmp: str, peers: str) -> list[str]:
        return [sys.executable] + [a.replace(TMP, tmp).replace(PEERS, peers) for a in self.argv]

    def display(self, peers: str = DEFAULT_PEERS) -> str:
        """The command as a user types it (no temporary output file)."""
        argv, skip = [], False
        for a in self.argv:
            if skip:
                skip = False
            elif a in ("--json", "--out"):
                skip = True
            else:
                argv.append(a.replace(PEERS, peers))
        return shlex.join(["python", *argv])


SUITE = [
    Entry("models_train", ["benchmarks/models.py", "--only", "train", "--peers", PEERS,
                           "--rounds", "3", "--iters", "3", "--warmup", "1", "--json", TMP],
          parse_models("train", "tokens_per_s", "train tokens/s, ours / PyTorch peer"),
          "LoRA train step, 25.3M Qwen2-layout model, 8 x 1024 tokens, vs PyTorch + PEFT",
          needs_peers=True),
    Entry("models_decode", ["benchmarks/models.py", "--only", "decode", "--peers", PEERS,
                            "--rounds", "3", "--iters", "3", "--json", TMP],
          parse_models("decode", "decode_tokens_per_s", "decode tokens/s, ours / PyTorch peer"),
          "decoding, batch 32, 128 new tokens, vs transformers `generate`", needs_peers=True),
    Entry("shared_prefix", ["benchmarks/shared_prefix.py", "--small", "--rounds", "3",
                            "--iters", "2", "--json", TMP],
          parse_shared_prefix,
          "a group's shared prompt once vs per episode: LoRA train step (tree vs flat packing) "
          "and prompt prefill, tiny model (`--small`)"),
    Entry("rl_step", ["benchmarks/rl_step.py", "--small", "--steps", "4", "--json", TMP],
          parse_rl_step,
          "whole RL steps, a group's prompt shared vs per episode, tiny random model on "
          "`sop_synth:aircraft_inspection` (`--small`)"),
    Entry("sandbox", ["benchmarks/sandbox_overhead.py", "--calls", "15", "--warmup", "2",
                      "--no-ablations", "--out", TMP],
          parse_sandbox,
          "code sandbox, per call of `print(1)`: `run_python` isolated (and unisolated) vs a "
          "plain `python -I -S` subprocess (lower is better)", repeat=3),
    Entry("long_cache", ["benchmarks/models.py", "--only", "long_cache", "--rounds", "2",
                         "--json", TMP],
          parse_long_cache,
          "decoding with a 4,096-slot cache: the C++ kernel and XLA over growing windows, vs "
          "XLA's attention over the whole cache", default=False),
    Entry("sandbox_quick", ["benchmarks/sandbox_overhead.py", "--calls", "3", "--warmup", "1",
                            "--no-ablations", "--out", TMP],
          parse_sandbox, "the sandbox entry at smoke-test size (seconds)", default=False,
          repeat=2, timeout_s=300.0),
]
ENTRIES = {e.name: e for e in SUITE}


# --- the fingerprint ----------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def fingerprint() -> dict:
    """Where and on what the suite ran (no package is imported: versions from metadata)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return dict(
        commit=_git("rev-parse", "HEAD"), dirty=None if status is None else bool(status),
        python=platform.python_version(), packages=versions, cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(), cpu_affinity=affinity,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        glibc_tunables_note="as the runner saw it; models.py re-execs itself with "
                            "glibc.malloc.hugetlb=1 added (mtrl_jax/runtime.py)",
        platform=platform.platform(), load_avg=list(os.getloadavg()),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


# --- running ------------------------------------------------------------------------------------

def _run_once(cmd: list[str], log, timeout_s: float) -> int:
    """Run ``cmd`` from the repository root, its output echoed and logged; its exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    watchdog = threading.Timer(timeout_s, proc.kill)  # a silent hang included
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            print("    " + line, end="", flush=True)
        code = proc.wait()
    finally:
        watchdog.cancel()
    if code < 0:
        log.append(f"[run.py] ended by signal {-code} (timeout {timeout_s:.0f} s)\n")
    return code


def run_entry(entry: Entry, peers: str | None) -> dict:
    out: dict = dict(name=entry.name, what=entry.what, display=entry.display(),
                     repeat=entry.repeat)
    if entry.needs_peers and not peers:
        out.update(status="skipped", reason=f"needs the PyTorch peer scripts ({DEFAULT_PEERS} "
                                            f"beside the clone, or --peers): not found")
        print(f"[run.py] {entry.name}: skipped: {out['reason']}", flush=True)
        return out
    tmpdir = tempfile.mkdtemp(prefix=f"bench_{entry.name}_")
    recs, log, codes = [], [], []
    t0 = time.perf_counter()
    try:
        for i in range(entry.repeat):
            tmp = os.path.join(tmpdir, f"{i}.json")
            cmd = entry.command(tmp, peers or DEFAULT_PEERS)
            out["command"] = shlex.join(cmd)
            print(f"[run.py] {entry.name}" + (f" ({i + 1}/{entry.repeat})" if entry.repeat > 1
                                             else "") + f": {out['command']}", flush=True)
            codes.append(_run_once(cmd, log, entry.timeout_s))
            if codes[-1] != 0:
                break
            with open(tmp) as f:
                recs.append(json.load(f))
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        out["exit_status"] = codes[-1]
        if codes[-1] != 0:
            raise RuntimeError(f"exit status {codes[-1]}")
        out["ratios"], out["info"] = entry.parse(recs)
        out["status"] = "ok"
    except Exception as e:  # recorded; the other entries go on
        out.setdefault("wall_s", round(time.perf_counter() - t0, 1))
        out.update(status="failed", error=f"{type(e).__name__}: {e}",
                   output_tail="".join(log[-30:]))
        print(f"[run.py] {entry.name}: FAILED ({out['error']})", flush=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


# --- comparison ---------------------------------------------------------------------------------

def compare_ratio(new: dict, base: dict, floor: float = FLOOR) -> dict:
    """The verdict on one ratio (see the module docstring for the rule)."""
    tol = max(floor, new.get("spread", 0.0), base.get("spread", 0.0))
    up = new.get("higher_is_better", True)
    better = (new["value"] / base["value"]) if up else (base["value"] / new["value"])
    if better < 1 / (1 + tol):
        verdict = "regression"
    elif better > 1 + tol:
        verdict = "improvement"
    else:
        verdict = "within noise"
    return dict(new=new["value"], baseline=base["value"], change=better - 1, tolerance=tol,
                verdict=verdict)


def compare(result: dict, baseline: dict, floor: float = FLOOR) -> dict:
    rows = []
    old = baseline.get("entries", {})
    for name, e in result.get("entries", {}).items():
        base = old.get(name, {}).get("ratios") or {}
        for key, r in (e.get("ratios") or {}).items():
            row = dict(entry=name, ratio=key)
            row.update(compare_ratio(r, base[key], floor) if key in base else
                       dict(new=r["value"], baseline=None, verdict="new"))
            rows.append(row)
        for key in base.keys() - (e.get("ratios") or {}).keys():  # the entry failed or skipped
            rows.append(dict(entry=name, ratio=key, new=None, baseline=base[key]["value"],
                             verdict=f"not measured ({e.get('status')})"))
    fp = baseline.get("fingerprint", {})
    return dict(baseline_commit=fp.get("commit"), baseline_date=fp.get("date"), floor=floor,
                rows=rows, regressions=sum(r["verdict"] == "regression" for r in rows))


def print_comparison(cmp: dict) -> None:
    print(f"\nvs baseline (commit {str(cmp['baseline_commit'])[:10]}, {cmp['baseline_date']}; "
          f"tolerance = max({cmp['floor']:.0%}, the per-round spreads)")
    print(f"{'entry':16s} {'ratio':22s} {'baseline':>9s} {'new':>9s} {'change':>8s} "
          f"{'tol':>5s}  verdict")
    for r in cmp["rows"]:
        if r["baseline"] is None or r["new"] is None:
            b, n = (f"{x:8.2f}x" if x is not None else f"{'-':>9s}"
                    for x in (r["baseline"], r["new"]))
            print(f"{r['entry']:16s} {r['ratio']:22s} {b} {n} {'':8s} {'':5s}  {r['verdict']}")
            continue
        print(f"{r['entry']:16s} {r['ratio']:22s} {r['baseline']:8.2f}x {r['new']:8.2f}x "
              f"{r['change']:+8.0%} {r['tolerance']:5.0%}  {r['verdict']}")


# --- README -------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return f"{x:.2f}"


def readme_table(result: dict) -> str:
    fp = result.get("fingerprint", {})
    commit = (fp.get("commit") or "?")[:10] + ("+local changes" if fp.get("dirty") else "")
    date = (fp.get("date") or "?")[:10]
    if fp.get("load_avg"):  # a busy machine slows both sides, but less evenly
        commit += f", load {fp['load_avg'][0]:.1f} on {fp.get('cpu_count')} cores"
    lines = ["| what | command | ratio (rounds) | date, commit |", "| --- | --- | --- | --- |"]
    for e in result.get("entries", {}).values():
        if e.get("status") == "ok":
            parts = []
            for key, r in e["ratios"].items():
                rounds = ", ".join(_fmt(x) for x in r["rounds"])
                lower = "" if r.get("higher_is_better", True) else ", lower is better"
                parts.append(f"{r.get('label') or key}: **{_fmt(r['value'])}x** "
                             f"({rounds}{lower})")
            figure = "; ".join(parts)
        elif e.get("status") == "skipped":
            figure = f"skipped: {e.get('reason', '')}"
        else:
            figure = f"failed: {e.get('error', '')}"
        runs = f" ({e['repeat']} runs: one value each)" if e.get("repeat", 1) > 1 else ""
        lines.append(f"| {e.get('what', e.get('name'))} | `{e.get('display', '')}`{runs} | "
                     f"{figure} | {date}, {commit} |")
    missing = [e.name for e in SUITE if e.default and e.name not in result.get("entries", {})]
    cut = result.get("complete") is False
    if missing or cut:
        names = ", ".join(f"`{n}`" for n in missing) or "none"
        lines.append(f"\nNot measured in this run{' (interrupted)' if cut else ''}: {names}.")
    return "\n".join(lines)


def rewrite_readme(text: str, table: str) -> str:
    """``text`` with the block between the markers replaced by ``table`` (nothing else)."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return text[:i + len(BEGIN)] + "\n" + table + "\n" + text[j:]


def update_readme(result: dict, path: str) -> bool:
    with open(path) as f:
        text = f.read()
    new = rewrite_readme(text, readme_table(result))
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


# --- main ---------------------------------------------------------------------------------------

def _write(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def _rel(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=None, help="comma list of entries (see --list)")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    p.add_argument("--peers", default=None,
                   help=f"folder of the PyTorch peer scripts (default {DEFAULT_PEERS} from the "
                        "repository root, when it exists)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--baseline", default=DEFAULT_BASELINE)
    p.add_argument("--floor", type=float, default=FLOOR,
                   help="smallest relative change flagged (default %(default)s)")
    p.add_argument("--fail-on-regression", action="store_true")
    p.add_argument("--save-baseline", action="store_true", help="copy the result to --baseline")
    p.add_argument("--readme", default=README, help="the README whose table is generated")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--readme-only", action="store_true",
                   help="only rewrite the README table from --from (default: --out)")
    p.add_argument("--from", dest="from_file", default=None)
    a = p.parse_args(argv)

    if a.list:
        for e in SUITE:
            peers = ", needs the peers" if e.needs_peers else ""
            runs = f" ({e.repeat} runs)" if e.repeat > 1 else ""
            print(f"{'*' if e.default else ' '} {e.name:14s} {e.display()}{runs}{peers}")
        return 0
    if a.readme_only:
        with open(_rel(a.from_file or a.out)) as f:
            result = json.load(f)
        changed = update_readme(result, _rel(a.readme))
        print(f"{a.readme}: table {'rewritten' if changed else 'unchanged'}")
        return 0

    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ENTRIES]
        if unknown:
            p.error(f"unknown entries {unknown}; known: {', '.join(ENTRIES)}")
    else:
        names = [e.name for e in SUITE if e.default]
    peers = a.peers if a.peers is not None else os.path.join(ROOT, DEFAULT_PEERS)
    peers = os.path.abspath(peers) if os.path.isdir(peers) else None

    t0 = time.perf_counter()
    out = _rel(a.out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    result = dict(fingerprint=fingerprint(), only=a.only, complete=False, entries={})
    for name in names:
        result["entries"][name] = run_entry(ENTRIES[name], peers)
        _write(out, result)  # an interrupted suite keeps the entries it finished
    result["complete"] = True
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["fingerprint"]["load_avg_end"] = list(os.getloadavg())

    print("\nratios (median of rounds):")
    for name, e in result["entries"].items():
        if e["status"] != "ok":
            print(f"  {name:16s} {e['status']}: {e.get('reason') or e.get('error')}")
            continue
        for key, r in e["ratios"].items():
            print(f"  {name:16s} {key:22s} {r['value']:6.2f}x  rounds "
                  f"{', '.join(_fmt(x) for x in r['rounds'])} (spread {r['spread']:.0%})")

    status = 0
    if os.path.exists(_rel(a.baseline)):
        with open(_rel(a.baseline)) as f:
            result["comparison"] = compare(result, json.load(f), a.floor)
        result["comparison"]["baseline"] = a.baseline
        print_comparison(result["comparison"])
        if a.fail_on_regression and result["comparison"]["regressions"]:
            status = 1
    else:
        print(f"\nno baseline at {a.baseline}: nothing compared")
    if any(e["status"] == "failed" for e in result["entries"].values()):
        status = 1

    _write(out, result)
    whole = {e.name for e in SUITE if e.default} <= set(names)
    print(f"\nwrote {a.out} ({result['wall_s']:.0f} s)")
    if a.save_baseline:
        shutil.copyfile(out, _rel(a.baseline))
        print(f"saved as the baseline: {a.baseline}"
              + ("" if whole else " (not the whole default suite: the baseline lacks the rest)"))
    if not a.no_readme and whole:
        update_readme(result, _rel(a.readme))
        print(f"{a.readme}: table rewritten")
    elif not a.no_readme:
        print(f"{a.readme}: not rewritten (not the whole default suite; --readme-only --from "
              f"{a.out} does)")
    return status


if __name__ == "__main__":
    sys.exit(main())
