"""A task family of your own, in Python, without editing the package: ``warehouse:stock``.

Each task asks how many units of a product are left after an order ships; the agent reads the
shelf with the ``stock`` tool and answers ``<final_output>{"left": <integer>}</final_output>``.
The module registers the family when it is imported, so load it with one option::

    mtrl env-check warehouse:stock --import examples/my_family.py

or from Python (``import_user_modules`` takes dotted module names or ``.py`` paths)::

    from mtrl_jax.envs.families import import_user_modules, load_tasks
    import_user_modules(["examples/my_family.py"])
    tasks = load_tasks("warehouse:stock", "train", n=8)

What a family provides (:class:`~mtrl_jax.envs.families.TaskFamily`): ``tasks(name, split, n,
seed)``, seeded so every process and run sees the same tasks; ``make_env(task, reward)``, a
fresh environment per episode, scoring with one of ``rewards`` (the first is the default, a
recipe's ``data.reward`` picks another); and ``oracle(task)``, the turns of a perfect agent,
which ``mtrl env-check`` plays to prove the environment solvable (strict success 1.0).
"""

from __future__ import annotations

import random

from mtrl_jax.envs.base import Environment, Episode, Task, ToolError
from mtrl_jax.envs.families import (
    TaskFamily,
    final_output_text,
    register_family,
    tool_call_text,
)
from mtrl_jax.envs.scoring import score_episode
from mtrl_jax.envs.tools import Tool, tool

SYSTEM = ("You work in a warehouse. Read the shelf with the stock tool, never guess, then answer "
          "as <final_output>{\"left\": <integer>}</final_output>.")
SIZES = {"train": 500, "val": 50, "test": 50}


def warehouse_tasks(name: str, split: str, n: int | None, seed: int) -> list[Task]:
    """``n`` tasks (all of the split when None), the same for the same (name, split, seed)."""
    rng = random.Random(f"warehouse:{name}:{seed}:{split}")
    tasks = []
    for i in range(n or SIZES.get(split, 50)):
        inventory = {f"SKU-{rng.randint(10, 99)}": rng.randint(5, 200) for _ in range(4)}
        sku = rng.choice(sorted(inventory))
        shipped = rng.randint(1, inventory[sku])
        tasks.append(Task(
            id=f"warehouse/{split}/{i}", family="warehouse", name=name,
            prompt=f"An order ships {shipped} units of {sku}. How many units of {sku} are "
                   "left on the shelf?",
            system=SYSTEM, expected={"left": inventory[sku] - shipped},
            data={"inventory": inventory, "sku": sku}, split=split))
    return tasks


class WarehouseEnvironment(Environment):
    """One shelf per episode (the task's inventory); one tool; a strict or dense reward."""

    def __init__(self, reward_kind: str):
        self.reward_kind = reward_kind

    async def setup(self, task: Task) -> None:
        self.task = task
        self.inventory = dict(task.data["inventory"])

    def tools(self) -> list[Tool]:
        env = self

        @tool
        def stock(sku: str) -> int:
            """Units of a product on the shelf.

            Args:
              sku: the product's stock-keeping unit, e.g. "SKU-42".
            """
            if sku not in env.inventory:
                raise ToolError(f"unknown SKU {sku!r}")  # the model reads "Error: unknown SKU"
            return env.inventory[sku]

        return [stock]

    def reward(self, episode: Episode) -> None:
        score_episode(episode, self.reward_kind)


def warehouse_oracle(task: Task) -> list[str]:
    """Read the shelf, then answer: what a perfect agent writes."""
    return [tool_call_text("stock", {"sku": task.data["sku"]}),
            final_output_text(task.expected or {})]


FAMILY = register_family(TaskFamily(
    name="warehouse", names=("stock",), tasks=warehouse_tasks,
    make_env=lambda task, reward: WarehouseEnvironment(reward), oracle=warehouse_oracle,
    rewards=("dense", "strict")))
