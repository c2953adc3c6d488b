"""Rollouts through `mtrl serve` (HTTP, vLLM's API) vs the in-process sampler, side by side.

    python benchmarks/serve_overhead.py --model <the CPU demo's warm base>   # demo-sized
    python benchmarks/serve_overhead.py --model PATH --tasks 16 --group 8 --rounds 3 \\
        --json benchmarks/results/serve_overhead.json

Workload: the CPU demo's recipe (``configs/demo_cpu.yaml``: ``sop_synth:preflight``, up to 5
turns of 64 sampled tokens, 256-token contexts), ``--tasks`` x ``--group`` concurrent episodes
(default 16 x 8 = 128) per rollout, sampled at temperature 1 with fresh LoRA adapters (the
base policy). Two runners on the same weights: ``in-process`` (the trainer's default sampler:
lockstep rounds over 128 KV-cache slots, shared prompt prefill) and ``server`` (the same
recipe with ``rollout.backend=server`` against one ``mtrl serve`` process on 127.0.0.1 with
128 slots: every turn is an HTTP request carrying the episode's tokens; the server batches what
arrives within 5 ms and reuses the slot that holds an episode's earlier turns). A first rollout
of each compiles and is discarded; then ``--rounds`` alternations. Reported: each arm's median
wall seconds per rollout and sampled tokens/s, and the server's overhead
``server / in-process - 1`` (the goal of issue 22: <= 10% at 128 concurrent episodes). Both
arms share this machine's two cores with the server process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "demo_cpu.yaml")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF folder (e.g. the demo's warm base)")
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="more recipe overrides (key=value)")
    args = p.parse_args(argv)

    from mtrl_jax.config import load_config
    from mtrl_jax.envs.families import load_tasks
    from mtrl_jax.rollout.runner import RolloutRunner, build_policy
    from mtrl_jax.serving.launch import LocalServer

    n = args.tasks * args.group
    base = [f"model.path={args.model}", f"rollout.batch_size={args.tasks}",
            f"rollout.group_size={args.group}", "tracker=none"] + list(args.overrides)
    cfg = load_config(RECIPE, base)
    server = LocalServer(args.model, lora_rank=cfg.lora.lora_rank,
                         lora_alpha=cfg.lora.lora_alpha, slots=n,
                         max_len=cfg.rollout.max_context_tokens).start()
    url = server.url
    try:
        arms = {}
        for name, extra in (("in-process", []),
                            ("server", ["rollout.backend=server",
                                        f"rollout.servers=[{url}]"])):
            c = load_config(RECIPE, base + extra)
            tokenizer, model = build_policy(c)
            arms[name] = RolloutRunner(c, tokenizer, model)
        d = cfg.data
        tasks = load_tasks(d.task, d.train_split, args.tasks * (args.rounds + 1), d.data_seed)
        rec = {name: [] for name in arms}
        for r in range(args.rounds + 1):
            batch = tasks[r * args.tasks:(r + 1) * args.tasks]
            for name, runner in arms.items():
                t1 = time.perf_counter()
                trajs = runner.run_episodes(batch, args.group, jax.random.key(r), tag=f"r{r}")
                wall = time.perf_counter() - t1
                tokens = sum(t.num_sampled_tokens for t in trajs)
                print(f"[round {r}{' (compiles, discarded)' if r == 0 else ''}] {name}: "
                      f"{wall:.1f} s, {tokens} sampled tokens, {tokens / wall:.0f} tokens/s, "
                      f"{sum(t.num_turns for t in trajs)} turns", flush=True)
                if r:
                    rec[name].append({"wall_s": wall, "sampled_tokens": tokens,
                                      "turns": sum(t.num_turns for t in trajs)})
        for runner in arms.values():
            runner.close()
        med = {k: statistics.median(x["wall_s"] for x in v) for k, v in rec.items()}
        ratios = [s["wall_s"] / i["wall_s"] for i, s in zip(rec["in-process"], rec["server"],
                                                            strict=True)]
        out = {"date": time.strftime("%Y-%m-%d %H:%M"), "episodes": n, "rounds": rec,
               "median_wall_s": med, "overhead_per_round": [x - 1 for x in ratios],
               "overhead": statistics.median(ratios) - 1}
        print(f"in-process {med['in-process']:.1f} s, server {med['server']:.1f} s per rollout "
              f"of {n} episodes: server overhead {out['overhead'] * 100:+.1f}% (rounds: "
              f"{', '.join(f'{(x - 1) * 100:+.1f}%' for x in ratios)})", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
