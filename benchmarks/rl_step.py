"""Whole RL steps with a group's shared prompt encoded once vs once per episode, side by side.

    python benchmarks/rl_step.py --model "$(mtrl fetch-model smollm2-135m)"
    python benchmarks/rl_step.py --model PATH --steps 3 --json benchmarks/results/rl_step.json
    python benchmarks/rl_step.py --small              # a minute: a tiny random model

Two trainers on one recipe, in one process, stepped in alternation (a slow spell of the
machine hits both): ``shared`` (the recipe as given: prompts prefilled once per group in
sampling, packed once per row in training) and ``flat`` (``rollout.shared_prefix_min_tokens=0
packing.shared_prefix_min_tokens=0``: every episode carries its own prompt through prefill and
through the train step). Both start from the same weights and seed, so they sample the same
tasks and the same episodes (step 1's reward and token counts are compared).

Default workload: ``configs/smollm2_135m.yaml`` on ``sop_synth:aircraft_manual`` (its
procedure is a ~2,000-token manual chapter; with the tool specs every episode's prompt is
~2,400 tokens), one group of 8 episodes per step, 3 turns of at most 128 sampled tokens, rows
of 4,096 tokens. The model is any HF folder or GGUF (``--model``); the base SmolLM2 never calls
a tool, so its episodes are one turn that runs to the turn budget.

Reported per arm: every step's time, its rollout and train parts and the seconds XLA spent
compiling inside it (``jax.monitoring``), trained and computed tokens, rows; the median of the
steps after the first, with and without compile time; their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.monitoring

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shared_prefix import fingerprint

from mtrl_jax import MultiTurnRLTrainer

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "smollm2_135m.yaml")

DEFAULT_OVERRIDES = [
    "data.task=sop_synth:aircraft_manual", "data.n_val=1", "data.n_test=1",
    "rollout.batch_size=1", "rollout.group_size=8", "rollout.max_turns=3",
    "rollout.sampling_max_tokens=128", "rollout.max_context_tokens=4096",
    "packing.row_lengths=[4096]", "packing.row_multiple=1", "packing.round_rows=multiple",
    "checkpoint_interval=0", "eval_interval=0", "tracker=none",
]

SMALL_OVERRIDES = [
    # the built-in random model and byte tokenizer (the manual would be ~11K bytes)
    "model.path=null", "model.remat=false", "lora.lora_rank=4",
    "data.task=sop_synth:aircraft_inspection", "data.n_val=1", "data.n_test=1",
    "rollout.batch_size=1", "rollout.group_size=4", "rollout.max_turns=2",
    "rollout.sampling_max_tokens=16", "rollout.max_context_tokens=4096",
    "packing.row_lengths=[4096]", "packing.row_multiple=1", "packing.round_rows=multiple",
    "checkpoint_interval=0", "eval_interval=0", "tracker=none",
]

FLAT = ["rollout.shared_prefix_min_tokens=0", "packing.shared_prefix_min_tokens=0"]


class CompileClock:
    """Seconds XLA spends compiling, summed from ``jax.monitoring`` duration events."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **_):
        if event.endswith("backend_compile_duration"):
            self.seconds += duration


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--model", default=None, help="model.path (HF folder or .gguf)")
    p.add_argument("--steps", type=int, default=3, help="steps per arm; the first compiles")
    p.add_argument("--small", action="store_true", help="tiny random model (a smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="more recipe overrides (key=value)")
    a = p.parse_args(argv)
    if not a.small and not a.model:
        p.error("--model PATH (e.g. $(mtrl fetch-model smollm2-135m)) or --small")
    base = list(SMALL_OVERRIDES if a.small else DEFAULT_OVERRIDES)
    if a.model and not a.small:
        base.append(f"model.path={a.model}")
    base += a.overrides
    clock = CompileClock()
    tmp = tempfile.mkdtemp(prefix="rl_step_")
    arms = {}
    for name, extra in (("shared", []), ("flat", FLAT)):
        t = time.perf_counter()
        arms[name] = MultiTurnRLTrainer(
            a.recipe, overrides=base + extra + [f"output_dir={os.path.join(tmp, name)}"],
            verbose=False)
        print(f"[rl_step] {name}: trainer built in {time.perf_counter() - t:.1f} s", flush=True)
    rec: dict[str, list[dict]] = {k: [] for k in arms}
    try:
        for step in range(a.steps):
            for name, tr in arms.items():
                c0 = clock.seconds
                m = tr.train_step()
                comp = clock.seconds - c0
                r = {"step": step + 1, "step_s": m["time/step_s"],
                     "rollout_s": m["time/rollout_s"], "train_s": m["time/train_s"],
                     "compile_s": comp, "reward": m.get("rollout/reward/mean"),
                     "trained_tokens": m.get("train/tokens"),
                     "rows": m.get("train/rows"), "row_length": m.get("train/row_length"),
                     "packing_efficiency": m.get("train/packing_efficiency"),
                     "shared_prefix_saving": m.get("train/shared_prefix_saving"),
                     "prefill_saved_frac": m.get("rollout/prefill_saved_frac"),
                     "context_tokens": m.get("rollout/tokens/context_mean"),
                     "sampled_tokens": m.get("rollout/tokens/response_mean")}
                rec[name].append(r)
                print(f"[rl_step] step {step + 1} {name:6s}: {r['step_s']:7.1f} s (rollout "
                      f"{r['rollout_s']:.1f}, train {r['train_s']:.1f}, compiling "
                      f"{comp:.1f}) reward {r['reward']}", flush=True)
    finally:
        for tr in arms.values():
            tr.close()
    out = dict(args=vars(a), overrides=base, env=fingerprint(), steps=rec)
    if a.steps > 1:
        summ = {}
        for name, rs in rec.items():
            later = rs[1:]
            summ[name] = {
                "step_s": statistics.median(r["step_s"] for r in later),
                "step_s_without_compile": statistics.median(r["step_s"] - r["compile_s"]
                                                            for r in later),
                "rollout_s": statistics.median(r["rollout_s"] for r in later),
                "train_s": statistics.median(r["train_s"] for r in later)}
        f, s = summ["flat"], summ["shared"]
        out["summary"] = dict(arms=summ, speedup=f["step_s"] / s["step_s"],
                              speedup_without_compile=f["step_s_without_compile"]
                              / s["step_s_without_compile"],
                              rollout_speedup=f["rollout_s"] / s["rollout_s"],
                              train_speedup=f["train_s"] / s["train_s"])
        o = out["summary"]
        print(f"[rl_step] median of steps 2..{a.steps}: flat {f['step_s']:.1f} s vs shared "
              f"{s['step_s']:.1f} s: {o['speedup']:.2f}x (without compile time "
              f"{o['speedup_without_compile']:.2f}x; rollout {o['rollout_speedup']:.2f}x, train "
              f"{o['train_speedup']:.2f}x)", flush=True)
    # sharing changes no episode: step 1 (same weights, seed, tasks) samples the same ones
    keys = ("reward", "context_tokens", "sampled_tokens")
    out["same_step1_episodes"] = all(rec["flat"][0][k] == rec["shared"][0][k] for k in keys)
    print(f"[rl_step] step 1 episodes equal in reward and lengths: "
          f"{out['same_step1_episodes']}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
