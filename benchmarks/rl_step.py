"""Whole RL steps with a group's shared prompt encoded once vs once per episode, side by side.

    python benchmarks/rl_step.py --model "$(mtrl fetch-model smollm2-135m)"
    python benchmarks/rl_step.py --model PATH --steps 3 --json benchmarks/results/rl_step.json
    python benchmarks/rl_step.py --small              # a minute: a tiny random model
    python benchmarks/rl_step.py --preset demo --model <the CPU demo's warm base>

Two trainers on one recipe, in one process, stepped in alternation (a slow spell of the
machine hits both): ``shared`` (the recipe as given: prompts prefilled once per group in
sampling, packed once per row in training) and ``flat`` (``rollout.shared_prefix_min_tokens=0
packing.shared_prefix_min_tokens=0``: every episode carries its own prompt through prefill and
through the train step). Both start from the same weights and seed, so they sample the same
tasks and the same episodes (step 1's reward and token counts are compared).

Default workload: ``configs/smollm2_135m.yaml`` on ``sop_synth:aircraft_manual`` (its
procedure is a ~2,000-token manual chapter; with the tool specs every episode's prompt is
~2,600 tokens), one group of 8 episodes per step, 3 turns of at most 128 sampled tokens, rows
of 3,072 or 4,096 tokens (each arm takes the one that computes fewer tokens: flat packing one
episode per 3,072-token row, shared packing the group's tree in one 4,096-token row). The
model is any HF folder or GGUF (``--model``); the base SmolLM2 never calls a tool, so its
episodes are one turn that runs to the turn budget.

Reported per arm: every step's time, its rollout and train parts and the seconds XLA spent
compiling inside it (``jax.monitoring``), trained and computed tokens, rows, and the train
step's arithmetic rate (its FLOPs, ``shared_prefix.train_flops``, over its seconds); the
median of the steps after the first, with and without compile time; their ratio.

``--preset demo``: the CPU demo's recipe (``configs/demo_cpu.yaml``) on its warm base, now vs
its packing before issue 21 (rows of 512 in counts of 4 x 2^j): the demo's step time
before/after and where its step goes.
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
from shared_prefix import fingerprint, train_flops

from mtrl_jax import MultiTurnRLTrainer

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "smollm2_135m.yaml")

DEFAULT_OVERRIDES = [
    "data.task=sop_synth:aircraft_manual", "data.n_val=1", "data.n_test=1",
    "rollout.batch_size=1", "rollout.group_size=8", "rollout.max_turns=3",
    "rollout.sampling_max_tokens=128", "rollout.max_context_tokens=4096",
    "packing.row_lengths=[3072,4096]", "packing.row_multiple=1", "packing.round_rows=multiple",
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

DEMO_RECIPE = os.path.join(os.path.dirname(RECIPE), "demo_cpu.yaml")
DEMO_OVERRIDES = ["checkpoint_interval=0", "eval_interval=0", "tracker=none"]
# the demo's packing before issue 21: rows of 512 in counts of 4 * 2^j
DEMO_BEFORE = ["packing.row_lengths=[512]", "packing.row_multiple=4", "packing.round_rows=pow2"]

#: preset -> (recipe, overrides of both arms, the baseline arm's overrides, arm names)
PRESETS = {
    "sop": (RECIPE, DEFAULT_OVERRIDES, FLAT, ("shared", "flat")),
    "small": (RECIPE, SMALL_OVERRIDES, FLAT, ("shared", "flat")),
    "demo": (DEMO_RECIPE, DEMO_OVERRIDES, DEMO_BEFORE, ("now", "before")),
}


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
    p.add_argument("--preset", choices=sorted(PRESETS), default="sop",
                   help="sop: shared vs flat prompts on the long-procedure workload; small: the "
                        "same on a tiny random model (a smoke run); demo: the CPU demo's recipe "
                        "now vs its packing before issue 21 (--model: the demo's warm base)")
    p.add_argument("--small", action="store_true", help="same as --preset small")
    p.add_argument("--recipe", default=None, help="instead of the preset's recipe")
    p.add_argument("--model", default=None, help="model.path (HF folder or .gguf)")
    p.add_argument("--steps", type=int, default=3, help="steps per arm; the first compiles")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="more recipe overrides (key=value)")
    a = p.parse_args(argv)
    if a.small:
        a.preset = "small"
    if a.preset != "small" and not a.model:
        p.error("--model PATH (e.g. $(mtrl fetch-model smollm2-135m), or the demo's warm base) "
                "or --preset small")
    recipe, base, baseline, names = PRESETS[a.preset]
    recipe = a.recipe or recipe
    base = list(base)
    if a.model and a.preset != "small":
        base.append(f"model.path={a.model}")
    base += a.overrides
    clock = CompileClock()
    tmp = tempfile.mkdtemp(prefix="rl_step_")
    arms = {}
    for name, extra in zip(names, ([], baseline), strict=True):
        t = time.perf_counter()
        arms[name] = MultiTurnRLTrainer(
            recipe, overrides=base + extra + [f"output_dir={os.path.join(tmp, name)}"],
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
                     "decode_s": m.get("time/rollout_decode_s"),
                     "outside_decode_s": m.get("time/rollout_outside_decode_s"),
                     "decode_slot_use": m.get("rollout/decode_slot_use"),
                     "context_tokens": m.get("rollout/tokens/context_mean"),
                     "sampled_tokens": m.get("rollout/tokens/response_mean")}
                if r["rows"]:
                    cfg = tr.runner.sampler.model.cfg
                    r["train_gflop"] = train_flops(
                        cfg, tr.config.lora.lora_rank, int(r["rows"]), int(r["row_length"])) * (
                        1.25 if tr.config.model.remat else 1.0) / 1e9
                    r["train_gflop_per_s"] = r["train_gflop"] / max(r["train_s"] - comp, 1e-9)
                rec[name].append(r)
                print(f"[rl_step] step {step + 1} {name:6s}: {r['step_s']:7.1f} s (rollout "
                      f"{r['rollout_s']:.1f}, train {r['train_s']:.1f}, compiling "
                      f"{comp:.1f}) reward {r['reward']}", flush=True)
    finally:
        for tr in arms.values():
            tr.close()
    out = dict(args=vars(a), recipe=recipe, overrides=base, baseline=baseline, arms=names,
               env=fingerprint(), steps=rec)
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
        s, f = summ[names[0]], summ[names[1]]
        out["summary"] = dict(arms=summ, speedup=f["step_s"] / s["step_s"],
                              speedup_without_compile=f["step_s_without_compile"]
                              / s["step_s_without_compile"],
                              rollout_speedup=f["rollout_s"] / s["rollout_s"],
                              train_speedup=f["train_s"] / s["train_s"])
        o = out["summary"]
        print(f"[rl_step] median of steps 2..{a.steps}: {names[1]} {f['step_s']:.1f} s vs "
              f"{names[0]} {s['step_s']:.1f} s: {o['speedup']:.2f}x (without compile time "
              f"{o['speedup_without_compile']:.2f}x; rollout {o['rollout_speedup']:.2f}x, train "
              f"{o['train_speedup']:.2f}x)", flush=True)
    # sharing changes no episode: step 1 (same weights, seed, tasks) samples the same ones
    keys = ("reward", "context_tokens", "sampled_tokens")
    out["same_step1_episodes"] = all(rec[names[0]][0][k] == rec[names[1]][0][k] for k in keys)
    print(f"[rl_step] step 1 episodes equal in reward and lengths: "
          f"{out['same_step1_episodes']}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
