"""Task families, named ``family:name`` everywhere (recipes, CLI, evaluation).

==========================================  ================================================
``sop_bench:<domain>``                       SOP-Bench domains (evaluation only), read from
                                             ``$MTRL_SOP_BENCH_DIR`` (see below)
``sop_synth:aircraft_inspection``,           our synthetic SOP domains (training data),
``sop_synth:loan_triage``                    generated once into ``$MTRL_DATA_DIR``
``math:arith``                               integer arithmetic through a calculator tool
``sql:employees``                            questions answered by SQL on a per-rollout
                                             in-memory SQLite database
==========================================  ================================================

SOP-Bench: point ``MTRL_SOP_BENCH_DIR`` at a folder holding the domain folders (in an
``amazon-science/SOP-Bench`` checkout: ``src/amazon_sop_bench/benchmarks/data``). Without it,
``../shared/sop-bench`` next to this repository is used when present. SOP-Bench data is licensed
CC BY-NC 4.0 and is for evaluation only: ``load_tasks`` refuses its ``train`` split.

Each family gives tasks, a per-episode environment factory and a scripted oracle (the turns a
perfect agent would produce, solving through the tools) used by ``mtrl env-check``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.scoring import dense_reward, strict_score
from mtrl_jax.envs.sop import SopDomain, SopEnvironment, load_sop_domain, oracle_calls
from mtrl_jax.envs.sop_synth import DOMAINS as SYNTH_DOMAINS
from mtrl_jax.envs.sop_synth import VERSIONS as SYNTH_VERSIONS
from mtrl_jax.envs.sop_synth import generate_domain
from mtrl_jax.envs.tools import tool
from mtrl_jax.envs.verifiable import MathError, SQLiteSandbox, safe_eval
from mtrl_jax.kernels.registry import Registry

SOP_MAPS = os.path.join(os.path.dirname(__file__), "sop_maps")
SOP_BENCH_DOMAINS = ("customer_service", "referral_abuse_detection_v1",
                     "traffic_spoofing_detection")


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """``tasks(name, split, n, seed)``, ``make_env(task)``, ``oracle(task) -> list[str]`` (the
    assistant turns of a perfect agent) and the task ``names``."""

    name: str
    names: tuple[str, ...]
    tasks: Callable[[str, str, int | None, int], list[Task]]
    make_env: Callable[[Task], Environment]
    oracle: Callable[[Task], list[str]]


FAMILIES: Registry[TaskFamily] = Registry("task family")


def split_task_name(full: str) -> tuple[TaskFamily, str]:
    if ":" not in full:
        raise ValueError(f"task names are 'family:name' (e.g. 'sop_synth:aircraft_inspection'),"
                         f" got {full!r}; families: {FAMILIES.names()}")
    fam_name, name = full.split(":", 1)
    fam = FAMILIES.get(fam_name)
    if name not in fam.names:
        raise KeyError(f"unknown task {full!r}; {fam_name} has: "
                       f"{[f'{fam_name}:{n}' for n in fam.names]}")
    return fam, name


def load_tasks(full_name: str, split: str = "train", n: int | None = None,
               seed: int = 0) -> list[Task]:
    """Tasks of ``family:name`` in ``split`` (the first ``n`` when given)."""
    fam, name = split_task_name(full_name)
    return fam.tasks(name, split, n, seed)


def make_env(task: Task) -> Environment:
    return FAMILIES.get(task.family).make_env(task)


def oracle_turns(task: Task) -> list[str]:
    return FAMILIES.get(task.family).oracle(task)


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + \
        "\n</tool_call>"


def final_output_text(fields: dict[str, Any]) -> str:
    return "<final_output>" + json.dumps(fields) + "</final_output>"


# ------------------------------------------------------------------------------ SOP domains

def _sop_oracle(domain: SopDomain, task: Task) -> list[str]:
    calls = "".join(tool_call_text(c["name"], c["arguments"]) for c in
                    oracle_calls(domain, task))
    return [calls, final_output_text(task.expected)]


def sop_bench_root() -> str | None:
    env = os.environ.get("MTRL_SOP_BENCH_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    candidate = os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "sop-bench"))
    return candidate if os.path.isdir(candidate) else None


@lru_cache(maxsize=16)
def sop_bench_domain(name: str) -> SopDomain:
    root = sop_bench_root()
    if root is None or not os.path.isdir(os.path.join(root, name)):
        raise FileNotFoundError(
            f"SOP-Bench domain {name!r} not found: set MTRL_SOP_BENCH_DIR to the folder holding "
            "the SOP-Bench domain folders (src/amazon_sop_bench/benchmarks/data in a checkout)")
    return load_sop_domain(os.path.join(root, name), family="sop_bench",
                           tool_map=os.path.join(SOP_MAPS, f"{name}.json"))


def _sop_bench_tasks(name, split, n, seed):
    if split == "train":
        raise ValueError("SOP-Bench is licensed for evaluation only (CC BY-NC 4.0): it has no "
                         "train split here. Train on sop_synth:* tasks.")
    tasks = sop_bench_domain(name).tasks("test")
    return tasks[:n] if n else tasks


FAMILIES.register("sop_bench", TaskFamily(
    "sop_bench", SOP_BENCH_DOMAINS, _sop_bench_tasks,
    lambda t: SopEnvironment(sop_bench_domain(t.name)),
    lambda t: _sop_oracle(sop_bench_domain(t.name), t)))


def data_dir() -> str:
    return os.environ.get("MTRL_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mtrl_jax")


def synth_domain(name: str, seed: int = 0) -> SopDomain:
    """The generated domain, written once per (name, seed, generator version) under
    :func:`data_dir`."""
    return _synth_domain(name, seed, data_dir())


@lru_cache(maxsize=16)
def _synth_domain(name: str, seed: int, root: str) -> SopDomain:
    folder = os.path.join(root, "sop_synth", f"{name}-seed{seed}-v{SYNTH_VERSIONS.get(name, 1)}")
    if not os.path.exists(os.path.join(folder, "tool_map.json")):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{name}-")
        generate_domain(name, tmp, seed=seed)
        try:
            os.rename(tmp, folder)  # atomic: concurrent generators agree on one copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_sop_domain(folder, family="sop_synth", name=name)


def _synth_tasks(name, split, n, seed):
    tasks = synth_domain(name, seed).tasks(split)
    tasks = tasks[:n] if n else tasks
    for t in tasks:
        t.data["seed"] = seed
    return tasks


FAMILIES.register("sop_synth", TaskFamily(
    "sop_synth", SYNTH_DOMAINS, _synth_tasks,
    lambda t: SopEnvironment(synth_domain(t.name, t.data.get("seed", 0))),
    lambda t: _sop_oracle(synth_domain(t.name, t.data.get("seed", 0)), t)))

# ------------------------------------------------------------------------------ math

MATH_SYSTEM = ("You solve arithmetic problems exactly. Use the calculator tool for every "
               "computation, then answer as <final_output>{\"answer\": <integer>}</final_output>.")


def _math_tasks(name, split, n, seed):
    rng = random.Random(f"math:{name}:{seed}:{split}")
    out = []
    for i in range(n or {"train": 2000, "val": 200, "test": 200}.get(split, 200)):
        nums = [rng.randint(2, 99) for _ in range(rng.randint(3, 5))]
        ops = [rng.choice(["+", "-", "*"]) for _ in range(len(nums) - 1)]
        expr = str(nums[0])
        for op, x in zip(ops, nums[1:], strict=True):
            expr = f"({expr} {op} {x})" if rng.random() < 0.5 else f"{expr} {op} {x}"
        value = safe_eval(expr)
        out.append(Task(id=f"math/{split}/{i}", family="math", name=name,
                        prompt=f"Compute {expr}.", system=MATH_SYSTEM,
                        expected={"answer": value}, data={"expression": expr}, split=split))
    return out


class MathEnvironment(Environment):
    def tools(self):
        @tool
        def calculator(expression: str) -> str:
            """Evaluate an arithmetic expression exactly.

            Args:
              expression: numbers, + - * / // % ** and parentheses.
            """
            try:
                return str(safe_eval(expression))
            except MathError as e:
                return f"Error: {e}"

        return [calculator]

    def reward(self, episode):
        episode.update_reward(*dense_reward(episode.final_text, episode.task.expected))


FAMILIES.register("math", TaskFamily(
    "math", ("arith",), _math_tasks, lambda t: MathEnvironment(),
    lambda t: [tool_call_text("calculator", {"expression": t.data["expression"]}),
               final_output_text(t.expected)]))

# ------------------------------------------------------------------------------ SQL

SQL_SYSTEM = ("Answer the question about the company database. Query it with the run_sql tool "
              "(SQLite, read-only; table employees(id, name, dept, salary, hire_year)), then "
              "answer as <final_output>{\"answer\": <value>}</final_output>.")
_DEPTS = ("sales", "ops", "research", "legal", "support")
_QUESTIONS = (
    ("How many employees work in {dept}?",
     "SELECT COUNT(*) FROM employees WHERE dept = '{dept}'"),
    ("How many employees in {dept} earn more than {x}?",
     "SELECT COUNT(*) FROM employees WHERE dept = '{dept}' AND salary > {x}"),
    ("What is the highest salary in {dept}?",
     "SELECT MAX(salary) FROM employees WHERE dept = '{dept}'"),
    ("Who was hired first in {dept} (lowest hire_year, then lowest id)?",
     "SELECT name FROM employees WHERE dept = '{dept}' ORDER BY hire_year, id LIMIT 1"),
    ("What is the total salary of employees hired after {year}?",
     "SELECT SUM(salary) FROM employees WHERE hire_year > {year}"),
)


def _sql_db(rng: random.Random) -> str:
    rows = []
    for i in range(1, rng.randint(12, 30)):
        rows.append(f"({i}, 'emp{i:02d}', '{rng.choice(_DEPTS)}', "
                    f"{rng.randrange(30000, 150000, 1000)}, {rng.randint(2005, 2024)})")
    return ("CREATE TABLE employees(id INTEGER PRIMARY KEY, name TEXT, dept TEXT, "
            "salary INTEGER, hire_year INTEGER);\nINSERT INTO employees VALUES "
            + ",\n".join(rows) + ";")


def _sql_tasks(name, split, n, seed):
    rng = random.Random(f"sql:{name}:{seed}:{split}")
    out = []
    for i in range(n or {"train": 2000, "val": 200, "test": 200}.get(split, 200)):
        setup = _sql_db(rng)
        q, ref = rng.choice(_QUESTIONS)
        params = {"dept": rng.choice(_DEPTS), "x": rng.randrange(40000, 140000, 5000),
                  "year": rng.randint(2008, 2022)}
        db = SQLiteSandbox(setup)
        try:
            value = db.query(ref.format(**params))["rows"][0][0]
        finally:
            db.close()
        value = 0 if value is None else value
        out.append(Task(id=f"sql/{split}/{i}", family="sql", name=name,
                        prompt=q.format(**params), system=SQL_SYSTEM,
                        expected={"answer": value},
                        data={"setup_sql": setup, "reference_sql": ref.format(**params)},
                        split=split))
    return out


class SQLEnvironment(Environment):
    """A fresh in-memory database per rollout (locked down: see ``SQLiteSandbox``)."""

    async def setup(self, task):
        self.task = task
        self.db = SQLiteSandbox(task.data["setup_sql"])

    async def teardown(self):
        db = getattr(self, "db", None)
        if db is not None:
            db.close()

    def tools(self):
        env = self

        @tool
        def run_sql(query: str) -> str:
            """Run one read-only SQLite query and return its rows as JSON.

            Args:
              query: a SELECT statement.
            """
            import sqlite3

            try:
                return json.dumps(env.db.query(query))
            except sqlite3.Error as e:
                return f"Error: {e}"

        return [run_sql]

    def reward(self, episode):
        episode.update_reward(*dense_reward(episode.final_text, episode.task.expected))


FAMILIES.register("sql", TaskFamily(
    "sql", ("employees",), _sql_tasks, lambda t: SQLEnvironment(),
    lambda t: [tool_call_text("run_sql", {"query": t.data["reference_sql"]}),
               final_output_text(t.expected)]))


def strict_task_score(task: Task, final_text: str | None) -> float:
    """The external evaluation of an answer to ``task``."""
    return strict_score(final_text, task.expected or {})
