"""1,000 episodes with injected faults leave no temp files, connections or child processes."""

import asyncio
import os
import random
import tempfile

from mtrl_jax.envs.base import Task
from mtrl_jax.envs.sandbox import SandboxEnvironment
from mtrl_jax.envs.tools import tool
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.sampler import ScriptedSampler

TOK = build_byte_tokenizer()
IM_END = TOK.convert_tokens_to_ids("<|im_end|>")


def child_pids() -> set[int]:
    me, out = os.getpid(), set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == me and fields[0] != "Z":
                    out.add(int(pid))
            except (OSError, IndexError):
                pass
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FaultyStore(SandboxEnvironment):
    """A per-episode key-value store: a temp folder, a SQLite file and a child process."""

    tool_timeout_s = 0.05

    def __init__(self, base: str, rng: random.Random):
        self.base, self.rng = base, rng

    async def create(self, task):
        folder = self.resources.temp_dir(base=self.base)
        self.db = self.resources.sqlite(os.path.join(folder, "store.db"))
        self.db.execute("CREATE TABLE kv(k TEXT, v TEXT)")
        await self.resources.process("sleep", "30")
        if self.rng.random() < 0.1:
            raise RuntimeError("injected fault in setup, after the resources exist")

    def tools(self):
        env = self

        @tool
        async def put(key: str, value: str) -> str:
            """Store a value."""
            r = env.rng.random()
            if r < 0.15:
                raise OSError("injected tool failure")
            if r < 0.25:
                await asyncio.sleep(1.0)  # > tool timeout
            env.db.execute("INSERT INTO kv VALUES (?, ?)", (key, value))
            return "stored"

        return [put]

    def reward(self, episode):
        if self.rng.random() < 0.05:
            raise ValueError("injected reward failure")
        episode.update_reward(1.0)


def test_thousand_faulty_episodes_leave_nothing_behind():
    base = tempfile.mkdtemp(prefix="mtrl_leak_test_")
    rng = random.Random(0)
    fds_before, kids_before = open_fds(), child_pids()
    put = '<tool_call>\n{"name": "put", "arguments": {"key": "a", "value": "b"}}\n</tool_call>'

    def script(eid, turn, toks):
        return put if turn < rng.randint(0, 3) else "done"

    sampler = ScriptedSampler(TOK, script, IM_END, delay_s=0.001)
    loop = AgentLoop(TOK, sampler, AgentLoopConfig(max_turns=4))

    async def main():
        sem = asyncio.Semaphore(100)
        outcomes = {"cancelled": 0}

        async def one(i):
            task = Task(id=str(i), family="test", name="store", prompt="store a=b")
            async with sem:
                coro = loop.run(FaultyStore(base, rng), task, episode_id=str(i))
                if rng.random() < 0.1:  # cancel mid-episode
                    try:
                        return await asyncio.wait_for(coro, timeout=rng.uniform(0.0, 0.03))
                    except TimeoutError:
                        outcomes["cancelled"] += 1
                        return None
                return await coro

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        return results, outcomes

    results, outcomes = asyncio.run(main())
    finished = [r for r in results if r is not None]
    reasons = {r.finish_reason for r in finished}
    assert "error" in reasons and "answered" in reasons
    assert outcomes["cancelled"] > 10
    assert sum(r.tool_error_count for r in finished) > 50
    assert os.listdir(base) == []  # no temp folders or SQLite files left
    assert child_pids() <= kids_before  # no child processes left
    assert open_fds() <= fds_before + 2  # connections and pipes closed
    os.rmdir(base)
