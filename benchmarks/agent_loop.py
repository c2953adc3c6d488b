"""Agent-loop throughput: episodes per second with a stub sampler, 256 concurrent episodes.

    python benchmarks/agent_loop.py                       # sop_synth:aircraft_inspection, math
    python benchmarks/agent_loop.py --tasks sql:employees --episodes 1024 --concurrency 256

The stub sampler replays the scripted oracle (2 turns, all tools called), so the figure is the
loop's own cost: chat-template rendering, tokenisation, tool-call parsing, replayed tool calls,
trajectory assembly and reward -- everything but the model. ``--sampler-delay-ms`` adds a
simulated generation latency per turn to show that concurrency hides it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from mtrl_jax.envs.families import load_tasks, make_env, oracle_turns
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.sampler import ScriptedSampler
from mtrl_jax.runtime import reexec_with_fast_malloc


async def run_once(task_name: str, episodes: int, concurrency: int, delay_s: float):
    tasks = load_tasks(task_name, "train", n=min(episodes, 2000))
    turns = {t.id: oracle_turns(t) for t in tasks}
    tok = build_byte_tokenizer()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    sampler = ScriptedSampler(tok, lambda eid, turn, _: turns[eid.split("#")[0]][turn], stop,
                              delay_s=delay_s)
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=4, sampling_max_tokens=4096,
                                                   max_context_tokens=1 << 16))
    group = max(1, episodes // len(tasks))
    t0 = time.perf_counter()
    trajs = await loop.run_many(make_env, tasks, group_size=group, concurrency=concurrency)
    dt = time.perf_counter() - t0
    assert all(t.finish_reason == "answered" for t in trajs), "oracle episodes must answer"
    n_turns = sum(t.num_turns for t in trajs)
    n_calls = sum(len(t.tool_calls) for t in trajs)
    n_tokens = sum(len(s) for t in trajs for s in t.samples)
    return dict(task=task_name, episodes=len(trajs), concurrency=concurrency,
                sampler_delay_ms=delay_s * 1e3, seconds=dt, episodes_per_s=len(trajs) / dt,
                turns_per_s=n_turns / dt, tool_calls_per_s=n_calls / dt,
                tokens_per_episode=n_tokens / len(trajs),
                mean_reward=statistics.mean(t.reward for t in trajs))


def main(argv=None) -> int:
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", default="sop_synth:aircraft_inspection,math:arith")
    p.add_argument("--episodes", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--sampler-delay-ms", type=float, default=0.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    records = []
    for name in args.tasks.split(","):
        asyncio.run(run_once(name, 64, 64, 0.0))  # warm-up: data generation, imports
        r = asyncio.run(run_once(name, args.episodes, args.concurrency,
                                 args.sampler_delay_ms / 1e3))
        records.append(r)
        print(f"{name:32s} {r['episodes']} episodes @ {r['concurrency']} concurrent: "
              f"{r['episodes_per_s']:7.1f} episodes/s, {r['turns_per_s']:7.1f} turns/s, "
              f"{r['tool_calls_per_s']:7.1f} tool calls/s, {r['tokens_per_episode']:.0f} "
              f"tokens/episode", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
