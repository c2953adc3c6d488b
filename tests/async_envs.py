"""Picklable environments for the asynchronous-rollout tests (worker processes import this
module by name)."""

from __future__ import annotations

import asyncio
import os

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.sandbox import Resources


class EvenBytes(Environment):
    """Reward: the share of even byte values in the last assistant turn (varied for a random
    policy, so advantages are non-zero)."""

    def reward(self, episode):
        text = next((m["content"] for m in reversed(episode.messages)
                     if m["role"] == "assistant"), "")
        data = text.encode()
        r = sum(b % 2 == 0 for b in data) / max(1, len(data))
        episode.update_reward(r, {"even": r})


def make_even_env(task: Task) -> Environment:
    return EvenBytes()


class HoldsResources(EvenBytes):
    """Like :class:`EvenBytes`, and each episode holds a temp folder and a ``sleep`` child
    process until teardown (what a killed worker leaves behind)."""

    async def setup(self, task):
        self.res = Resources()
        self.dir = self.res.temp_dir(prefix="mtrl_async_test_")
        with open(os.path.join(self.dir, "marker"), "w") as f:
            f.write(task.id)
        await self.res.process("sleep", "300")
        await asyncio.sleep(self.hold_s)  # a slow setup: kills land mid-episode

    hold_s = 0.4

    async def teardown(self):
        await self.res.close()


def make_resource_env(task: Task) -> Environment:
    return HoldsResources()


def make_failing_env(task: Task) -> Environment:
    raise ValueError(f"no fixture for task {task.id} (a bug in make_env)")


def tasks(split: str, n: int) -> list[Task]:
    return [Task(id=f"{split}{i}", family="custom", name="even", prompt=f"Say {i}.",
                 split=split) for i in range(n)]


class BrokenSetup(EvenBytes):
    async def setup(self, task):
        raise RuntimeError("the sandbox image is missing")


def make_broken_setup_env(task: Task) -> Environment:
    return BrokenSetup()


class Lenient(EvenBytes):
    """Credits every episode: far more lenient than the strict scorer."""

    def reward(self, episode):
        episode.update_reward(1.0)


def make_lenient_env(task: Task) -> Environment:
    return Lenient()


class DenseFields(EvenBytes):
    """The SOP-style dense reward on the task's expected fields (per-field metrics)."""

    def reward(self, episode):
        from mtrl_jax.envs.scoring import dense_reward

        r, metrics = dense_reward(episode.final_text, episode.task.expected)
        text = next((m["content"] for m in reversed(episode.messages)
                     if m["role"] == "assistant"), "")
        data = text.encode()
        even = sum(b % 2 == 0 for b in data) / max(1, len(data))
        episode.update_reward(r + 0.5 * even, metrics)  # varied, so groups have signal


def make_fields_env(task: Task) -> Environment:
    return DenseFields()


def _even_tasks(name: str, split: str, n: int | None, seed: int) -> list[Task]:
    return [Task(id=f"even/{split}/{i}", family="evenbytes", name=name,
                 prompt=f"Write {i % 7} words.", split=split) for i in range(n or 32)]


def register_even_family():
    """``evenbytes:any`` (the :class:`EvenBytes` reward), for command-line runs that need
    varied rewards from a random policy (``--import tests/async_envs.py``)."""
    from mtrl_jax.envs.families import TaskFamily, register_family

    return register_family(TaskFamily(name="evenbytes", names=("any",), tasks=_even_tasks,
                                      make_env=lambda task, reward: EvenBytes()))


EVEN_FAMILY = register_even_family()
