"""Wall time of N demo training steps with asynchronous rollouts, k = max_steps_off_policy.

    python benchmarks/async_rollouts.py --steps 30 --ks 0 1 2 --latencies 0 0.1

For every (simulated tool latency, k) pair, in a fresh process: the demo recipe
(configs/demo_cpu.yaml on the cached warm-up base; built on first use, ~6 min) trains N steps
from the same start, then plays the validation split greedily. k = 0 is the synchronous
trainer (rollouts and updates in turn, one process); k >= 1 runs the rollouts in a worker
process that generates up to k steps ahead; worker start-up is inside the measured wall time.
Every process (trainer and workers) shares one persistent XLA compilation cache, warmed by a
discarded short run first (``--cold`` skips that, so compile time is inside every figure).

Reported: wall seconds, seconds per step (also without the first step), the speedup over the
first ``--ks`` value at the same latency (configurations run one after another in this
invocation), validation strict task success with its standard error, the staleness trained on.
Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np


def run_one(lat: float, k: int, steps: int, seed: int, overrides: list[str]) -> dict:
    """One configuration, in this (fresh) process."""
    from mtrl_jax.demo import DEMO_RECIPE, warmup
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    base = warmup(verbose=False)
    out_dir = tempfile.mkdtemp(prefix=f"mtrl_async_bench_lat{lat}_k{k}_")
    t = MultiTurnRLTrainer(DEMO_RECIPE, overrides=[
        f"model.path={base}", f"seed={seed}", f"output_dir={out_dir}", f"steps={steps}",
        "eval_interval=0", "checkpoint_interval=0", f"rollout.simulated_tool_latency_s={lat}",
        f"async_config.max_steps_off_policy={k}", *overrides],
        resume=False, verbose=False, tracking_uri=f"sqlite:///{out_dir}/mlflow.db")
    t0 = time.perf_counter()
    hist = t.train()
    wall = time.perf_counter() - t0
    val = t.evaluate("val", log_traces=False)
    t.close()
    succ = val["val/greedy/strict_success"]
    n_val = len(t.val_tasks)
    return {
        "latency_s": lat, "k": k, "steps": steps, "wall_s": wall, "s_per_step": wall / steps,
        "s_per_step_after_first": sum(m["time/step_s"] for m in hist[1:]) / max(1, steps - 1),
        "val_success": succ, "val_success_se": math.sqrt(succ * (1 - succ) / n_val),
        "val_sampled_success": val.get("val/sampled/strict_success"),
        "train_reward_last4": sum(m["rollout/reward/mean"] for m in hist[-4:]) / 4,
        "staleness_mean": sum(m.get("async/staleness/mean", 0.0) for m in hist) / len(hist),
        "rollout_wait_s": sum(m.get("async/wait_s", m["time/rollout_s"]) for m in hist),
        "train_s": sum(m["time/train_s"] for m in hist),
        "is_weight_max": max(m.get("train/is_weight_max", 1.0) for m in hist),
    }


def main() -> None:
    from mtrl_jax.runtime import reexec_with_fast_malloc

    reexec_with_fast_malloc()  # workers inherit the setting (mtrl_jax/runtime.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.1],
                    help="simulated seconds per tool call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="rollout worker counts tried at the largest k (1 worker elsewhere)")
    ap.add_argument("--out", default="benchmarks/results/async_rollouts.json")
    ap.add_argument("--one", nargs=2, type=float, metavar=("LATENCY", "K"),
                    help="run one configuration in this process (used by the driver)")
    ap.add_argument("--cold", action="store_true",
                    help="skip warming the persistent compilation cache (compiles are timed)")
    ap.add_argument("--compile-cache", default=None)
    ap.add_argument("--backends", nargs="+", default=["process"], choices=["process", "ray"],
                    help="rollout worker backends run side by side at every k > 0 "
                    "(async_config.backend); the ray rows report their wall time over the "
                    "process rows' as ray_vs_process")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per configuration, interleaved (every configuration once, then "
                    "again): rows report the median run's figures and every run's wall time "
                    "(an asynchronous run's episodes depend on timing, so runs differ)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value)")
    args = ap.parse_args()

    if args.one is not None:
        lat, k = args.one
        print("RESULT " + json.dumps(run_one(lat, int(k), args.steps, args.seed,
                                             args.overrides)), flush=True)
        return
    from mtrl_jax.demo import warmup

    warmup()  # build the demo base once (cached)
    cache = args.compile_cache or tempfile.mkdtemp(prefix="mtrl_async_bench_xla_")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def one(lat: float, k: int, steps: int, workers: int = 1, backend: str = "process") -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", str(lat), str(k),
                              "--steps", str(steps), "--seed", str(args.seed),
                              *args.overrides, f"async_config.num_workers={workers}",
                              f"async_config.backend={backend}"],
                             env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f"config latency={lat} k={k} failed:\n{out.stderr[-4000:]}")
        return {**json.loads(line[len("RESULT "):]), "workers": workers if k > 0 else 0,
                "backend": backend if k > 0 else "-"}

    if not args.cold:  # every process then starts from the same warm compilation cache
        print("warming the compilation cache (k = 0 and k = 1, 2 steps, discarded)", flush=True)
        for k in sorted({0, max(1, max(args.ks))}):
            for backend in (args.backends if k > 0 else ["process"]):
                one(args.latencies[0], k, 2, backend=backend)
    rows = []
    for lat in args.latencies:
        configs = [(kk, w, b) for kk in args.ks
                   for w in (args.workers if kk == max(args.ks) and kk > 0 else [1])
                   for b in (args.backends if kk > 0 else ["process"])]
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for rep in range(args.repeats):
            for k, workers, backend in configs:
                row = one(lat, k, args.steps, workers, backend)
                runs[k, workers, backend].append(row)
                print(f"  run {rep + 1}/{args.repeats}: latency {lat * 1e3:.0f} ms k={k} "
                      f"workers={workers} backend={backend}: wall {row['wall_s']:.1f} s, "
                      f"{row['s_per_step_after_first']:.2f} s/step after the first", flush=True)
        for c in configs:
            rs = sorted(runs[c], key=lambda r: r["wall_s"])
            row = dict(rs[(len(rs) - 1) // 2])  # the median run (use an odd --repeats)
            if len(rs) > 1:
                row["runs_wall_s"] = [r["wall_s"] for r in runs[c]]
                row["runs_s_per_step_after_first"] = [r["s_per_step_after_first"]
                                                      for r in runs[c]]
                row["s_per_step_after_first"] = float(np.median(row["runs_s_per_step_after_first"]))
                row["wall_s"] = float(np.median(row["runs_wall_s"]))
            rows.append(row)
            print(f"latency {lat * 1e3:>4.0f} ms  k={row['k']}  workers={row['workers']}  "
                  f"backend={row['backend']}  "
                  f"wall {row['wall_s']:7.1f} s  "
                  f"({row['s_per_step']:.2f} s/step, {row['s_per_step_after_first']:.2f} after "
                  f"the first)  val success {row['val_success']:.3f} "
                  f"+- {row['val_success_se']:.3f}  staleness {row['staleness_mean']:.2f}",
                  flush=True)
    for r in rows:
        ref = next(x for x in rows if x["latency_s"] == r["latency_s"] and x["k"] == args.ks[0])
        r["speedup"] = ref["wall_s"] / r["wall_s"]
        if r.get("backend") == "ray":
            proc = next((x for x in rows if x.get("backend") == "process"
                         and (x["latency_s"], x["k"], x["workers"])
                         == (r["latency_s"], r["k"], r["workers"])), None)
            if proc is not None:
                r["ray_vs_process"] = r["wall_s"] / proc["wall_s"]
                r["ray_vs_process_steady"] = (r["s_per_step_after_first"]
                                              / proc["s_per_step_after_first"])
    print("\nlatency  k  workers  backend   wall_s  speedup  s/step>1  steady speedup  "
          "val_success  ray/process")
    for r in rows:
        ref = next(x for x in rows if x["latency_s"] == r["latency_s"] and x["k"] == args.ks[0])
        r["steady_speedup"] = ref["s_per_step_after_first"] / r["s_per_step_after_first"]
        vs = f"{r['ray_vs_process']:.3f}" if "ray_vs_process" in r else "-"
        print(f"{r['latency_s'] * 1e3:5.0f}ms  {r['k']}  {r['workers']:>7}  "
              f"{r.get('backend', '-'):>7}  {r['wall_s']:7.1f}  "
              f"{r['speedup']:6.2f}x  {r['s_per_step_after_first']:8.2f}  "
              f"{r['steady_speedup']:13.2f}x  {r['val_success']:.3f} +- "
              f"{r['val_success_se']:.3f}  {vs}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "args": vars(args), "rows": rows}, f, indent=2)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
