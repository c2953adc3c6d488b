"""Per-call wall time of a trivial program (``print(1)``) through the Python code sandbox.

    python benchmarks/sandbox_overhead.py                 # 30 calls per variant
    python benchmarks/sandbox_overhead.py --calls 60 --no-ablations

Variants, measured side by side in one run (round-robin: call 1 of every variant, then call 2,
..., so load on the machine hits them alike):

- ``python -I -S``: a plain ``subprocess.run([python, "-I", "-S", "-c", "print(1)"])`` of the
  sandbox's interpreter -- the floor;
- ``python + launcher``: the same with the launcher (rlimits, audit hook, main.py as __main__);
- ``bwrap + python -I -S``: the sandbox's full bwrap command line around the plain interpreter,
  by a bare ``subprocess.run`` (as root: through setpriv);
- ``run_python unisolated``: the explicit fallback (no bubblewrap; launcher with rlimits and
  the audit hook, ``setpriv --pdeathsig``, ``unshare -n``);
- ``run_python isolated``: the sandbox as used in training;
- ablations: ``run_python isolated`` with one ingredient taken out (the bwrap option, the
  seccomp filter, the audit hook, the setpriv uid drop...), so ``isolated - ablation`` is what
  that ingredient costs.

Reported per variant: median, 10th and 90th percentile milliseconds per call, and the median
over the plain interpreter's. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from mtrl_jax.envs import code_sandbox as cs

CODE = "print(1)"


def _without(*drop: str, count: int = 1) -> Callable[[list[str]], list[str]]:
    """Remove option ``drop[0]`` and its ``count`` arguments (or a run of flags)."""
    def edit(args: list[str]) -> list[str]:
        args = list(args)
        for flag in drop:
            if flag in args:
                i = args.index(flag)
                del args[i:i + 1 + count]
        return args
    return edit


def _ablations(plan: cs._Plan) -> dict[str, tuple[Callable[[list[str]], list[str]], dict]]:
    """name -> (edit of the bwrap argument list, replacements of plan fields)."""
    out: dict[str, tuple[Callable[[list[str]], list[str]], dict]] = {
        "- seccomp filter": (lambda a: a, {"seccomp": False}),
        "- --disable-userns": (lambda a: a, {"userns_flags": ("--unshare-user",)}),
        "- --dev /dev": (_without("--dev"), {}),
        "- --tmpfs /tmp": (_without("--size", count=3), {}),
        "- --info-fd (no wait for init)": (_without("--info-fd"), {}),
        "- --new-session --die-with-parent": (
            lambda a: [x for x in a if x not in ("--new-session", "--die-with-parent")], {}),
        "- pid/net/ipc/uts/cgroup namespaces": (
            lambda a: [x for x in _without("--hostname")(a) if x != "--unshare-all"], {}),
    }
    if plan.drop:
        out["- setpriv uid drop (root in userns)"] = (lambda a: a, {"drop": ()})
        out["  setpriv -> Popen(user=) (fork, no vfork)"] = (lambda a: a, {
            "drop": (), "drop_kwargs": (("user", cs.SANDBOX_UID), ("group", cs.SANDBOX_UID),
                                        ("extra_groups", []))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=30, help="calls per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/sandbox_overhead.json")
    args = ap.parse_args()

    plan, problem = cs._probe()
    python = plan.python if plan else os.path.realpath(sys._base_executable)
    limits = cs.PythonLimits()
    variants: dict[str, Callable[[], object]] = {
        "python -I -S (plain subprocess)": lambda: subprocess.run(
            [python, "-I", "-S", "-c", CODE], capture_output=True, env={}, check=True),
        "run_python unisolated": lambda: _check(cs._execute(None, CODE, limits, None, "",
                                                            audit_hook=True)),
    }
    scratch = tempfile.mkdtemp(prefix="mtrl_bench_")
    with open(os.path.join(scratch, "main.py"), "w") as f:
        f.write(CODE)
    if plan is not None and plan.drop:  # as run_python does: the folder is the sandbox's
        os.chown(scratch, cs.SANDBOX_UID, cs.SANDBOX_UID)
    launcher = cs._launcher_args(python, limits, 0, True, plan.precompiled if plan else False)
    variants["python + launcher (rlimits, hook)"] = lambda: subprocess.run(
        launcher, cwd=scratch, capture_output=True, env={}, check=True)
    if plan is None:
        print(f"no sandbox here ({problem}): measuring the plain and unisolated variants only")
    else:
        variants["bwrap (all options) + python -I -S"] = lambda: _bare_bwrap(
            plan, limits, scratch, [python, "-I", "-S", "-c", CODE])
        variants["run_python isolated"] = lambda: _check(cs._execute(
            plan, CODE, limits, None, "", audit_hook=True))
        variants["  - audit hook"] = lambda: _check(cs._execute(
            plan, CODE, limits, None, "", audit_hook=False))
        if not args.no_ablations:
            original = cs._bwrap_args
            for name, (edit, fields) in _ablations(plan).items():
                variant_plan = cs._Plan(**{**plan.__dict__, **fields})

                def call(edit=edit, variant_plan=variant_plan):
                    cs._bwrap_args = lambda *a, **k: edit(original(*a, **k))
                    try:
                        return _check(cs._execute(variant_plan, CODE, limits, None, "",
                                                  audit_hook=True))
                    finally:
                        cs._bwrap_args = original

                variants["  " + name] = call

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.calls):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)

    floor = statistics.median(times["python -I -S (plain subprocess)"])
    rows = []
    print(f"\n{'variant':44s} {'median ms':>9s} {'p10':>7s} {'p90':>7s} {'x plain':>8s}")
    for name, xs in times.items():
        xs.sort()
        med = statistics.median(xs)
        p10, p90 = xs[len(xs) // 10], xs[min(len(xs) - 1, (9 * len(xs)) // 10)]
        rows.append({"variant": name.strip(), "median_ms": med, "p10_ms": p10, "p90_ms": p90,
                     "x_plain": med / floor, "calls": len(xs)})
        print(f"{name:44s} {med:9.1f} {p10:7.1f} {p90:7.1f} {med / floor:8.2f}")
    if plan is not None:
        full = statistics.median(times["run_python isolated"])
        print(f"\nisolated run_python: {full:.1f} ms median per trivial call "
              f"({'under' if full < 50 else 'over'} the 50 ms goal); "
              f"ablation rows: what remains without that ingredient")
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "sandbox_python": python, "args": vars(args), "rows": rows,
              "bwrap": subprocess.run(["bwrap", "--version"], capture_output=True,
                                      text=True).stdout.strip() if plan else None}
    shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")


def _bare_bwrap(plan: cs._Plan, limits: cs.PythonLimits, scratch: str, cmd: list[str]) -> None:
    """The sandbox's bwrap command line around ``cmd``, run by a plain subprocess.run (none of
    run_python's work around it: scratch folder, script, pipes, waiting for init)."""
    wd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    sec = os.memfd_create("seccomp")
    os.write(sec, cs._seccomp_filter(no_fork=True) or b"")
    os.lseek(sec, 0, os.SEEK_SET)
    r, w = os.pipe()
    try:
        subprocess.run(cs._bwrap_args(plan, limits, wd, sec if plan.seccomp else None, w) + cmd,
                       capture_output=True, env={}, pass_fds=(wd, sec, w), check=True)
    finally:
        for fd in (wd, sec, r, w):
            os.close(fd)


def _check(result: cs.PythonResult) -> cs.PythonResult:
    if not (result.ok and result.stdout == "1\n"):
        raise SystemExit(f"the trivial program failed: {result}")
    return result


if __name__ == "__main__":
    main()
