"""Task families, named ``family:name`` everywhere (recipes, CLI, evaluation).

==========================================  ================================================
``sop_bench:<domain>``                       SOP-Bench-format domains: a folder under
                                             ``$MTRL_SOP_BENCH_DIR``, or a path (SOP-Bench's
                                             own domains: evaluation only)
``sop_synth:aircraft_inspection``,           our synthetic SOP domains (training data),
``sop_synth:aircraft_manual``,               generated once into ``$MTRL_DATA_DIR``
``sop_synth:loan_triage``,                   (``aircraft_manual``: the aircraft checks in a
``sop_synth:preflight``                      ~2,000-token manual chapter)
``math:arith``                               integer arithmetic through a calculator tool
``sql:employees``                            questions answered by SQL on a per-rollout
                                             in-memory SQLite database
==========================================  ================================================

SOP-Bench: point ``MTRL_SOP_BENCH_DIR`` at a folder holding the domain folders (in an
``amazon-science/SOP-Bench`` checkout: ``src/amazon_sop_bench/benchmarks/data``); several
folders may be given, separated by ``os.pathsep`` (``:`` on Linux). ``sop_bench:<name>`` is the
folder ``<name>`` under the first of them that has it, or ``<name>`` is a path to a domain folder
(``sop_bench:./my_domain``). The package ships tool maps for the SOP-Bench domains
:data:`SOP_BENCH_DOMAINS`; any other domain folder brings its own ``tool_map.json`` (a folder's
own map always wins; format in :mod:`mtrl_jax.envs.sop`). SOP-Bench data is licensed CC BY-NC
4.0 and is for evaluation only: ``load_tasks`` refuses a ``train`` split of its domains
(:data:`SOP_BENCH_DOMAINS`); a domain of your own trains from its ``train_set_with_outputs.csv``.

Each family gives tasks, a per-episode environment factory taking a reward kind (the family's
``rewards``; the first is its default), and a scripted oracle (the turns a perfect agent would
produce, solving through the tools) used by ``mtrl env-check``.

A task family of your own, without editing the package: write a module that calls
:func:`register_family` at import time, and load it with :func:`import_user_modules` (a dotted
module name or a ``.py`` file; the CLI's ``--import`` and the recipe's import list call it)::

    register_family(TaskFamily(
        name="shop", names=("orders",), tasks=my_tasks,          # (name, split, n, seed)
        make_env=lambda task, reward: ShopEnv(), oracle=my_oracle))

``examples/my_family.py`` is a complete one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.scoring import dense_reward, strict_score
from mtrl_jax.envs.sop import (
    SOP_REWARDS,
    SopDomain,
    SopEnvironment,
    did_you_mean,
    load_sop_domain,
    oracle_calls,
)
from mtrl_jax.envs.sop_synth import DOMAINS as SYNTH_DOMAINS
from mtrl_jax.envs.sop_synth import VERSIONS as SYNTH_VERSIONS
from mtrl_jax.envs.sop_synth import generate_domain
from mtrl_jax.envs.tools import tool
from mtrl_jax.envs.verifiable import MathError, SQLiteSandbox, safe_eval
from mtrl_jax.kernels.registry import Registry

SOP_MAPS = os.path.join(os.path.dirname(__file__), "sop_maps")
#: SOP-Bench domains whose tool maps ship with the package (``sop_maps/<name>.json``).
SOP_BENCH_DOMAINS = tuple(sorted(f[:-len(".json")] for f in os.listdir(SOP_MAPS)
                                 if f.endswith(".json")))


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """A named set of tasks and how to play them.

    Attributes:
      name: the ``family`` part of ``family:name`` (no ``:``).
      names: the task names it has, or a function listing them (for families whose tasks
        live in folders the user adds, like ``sop_bench``).
      tasks: ``tasks(name, split, n, seed) -> list[Task]`` (all of the split when ``n`` is
        None; ``Task.family`` must be this family's ``name``).
      make_env: ``make_env(task, reward) -> Environment``, one per episode; ``reward`` is one
        of ``rewards``.
      oracle: ``oracle(task) -> list[str]``, the assistant turns of a perfect agent (tool calls,
        then the answer); ``mtrl env-check`` needs it.
      rewards: the reward kinds ``make_env`` understands; the first is the default.
      has: ``has(name) -> bool`` for names that ``names`` cannot list (default: in ``names``).
      hint: ``hint() -> str``, appended to the message for an unknown task name.
    """

    name: str
    names: Sequence[str] | Callable[[], Sequence[str]]
    tasks: Callable[[str, str, int | None, int], list[Task]]
    make_env: Callable[[Task, str], Environment]
    oracle: Callable[[Task], list[str]] | None = None
    rewards: tuple[str, ...] = ("dense",)
    has: Callable[[str], bool] | None = None
    hint: Callable[[], str] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"a task family's name is a non-empty string without ':', got "
                             f"{self.name!r}")
        if not callable(self.names):
            object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "rewards", tuple(self.rewards))
        if not self.rewards or not all(isinstance(r, str) for r in self.rewards):
            raise ValueError(f"task family {self.name!r}: rewards must be a non-empty tuple of "
                             f"reward kind names, got {self.rewards!r}")
        for field in ("tasks", "make_env"):
            if not callable(getattr(self, field)):
                raise TypeError(f"task family {self.name!r}: {field} must be callable")

    def known_names(self) -> list[str]:
        """The task names this family can list."""
        return list(self.names() if callable(self.names) else self.names)

    def has_task(self, name: str) -> bool:
        return self.has(name) if self.has is not None else name in self.known_names()

    def reward(self, kind: str | None) -> str:
        """``kind`` checked against ``rewards``; ``None`` -> the default (the first)."""
        if kind is None:
            return self.rewards[0]
        if kind not in self.rewards:
            raise ValueError(f"task family {self.name!r} has no reward {kind!r}."
                             f"{did_you_mean(kind, self.rewards)} Valid: {list(self.rewards)}")
        return kind


#: All families by name. Add yours with :func:`register_family`.
FAMILIES: Registry[TaskFamily] = Registry("task family")


def register_family(family: TaskFamily) -> TaskFamily:
    """Make ``family`` available as ``family.name:<task>`` to every command.

    Registering the same object again is a no-op (a module may be imported twice in one
    process); another family under a registered name is an error.
    """
    if not isinstance(family, TaskFamily):
        raise TypeError(f"register_family takes a TaskFamily, got {type(family).__name__}")
    if family.name in FAMILIES:
        if FAMILIES.get(family.name) is family:
            return family
        raise ValueError(f"task family {family.name!r} is already registered (by "
                         f"{_origin(FAMILIES.get(family.name))}); choose another name")
    return FAMILIES.register(family.name, family)


def _origin(family: TaskFamily) -> str:
    return getattr(family.tasks, "__module__", None) or "an unknown module"


def import_user_module(spec: str) -> types.ModuleType:
    """Import one user module: a dotted name (the working directory is put on ``sys.path``) or a
    path to a ``.py`` file (imported once per process under a name derived from its real path,
    so importing it again returns the same module). Errors name ``spec``."""
    if spec.endswith(".py") or "/" in spec or os.sep in spec:
        path = os.path.realpath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"user module {spec!r}: no such file ({path})")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        mod_name = f"_mtrl_user_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"user module {spec!r}: cannot be imported as Python ({path})")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # before running it: dataclasses and pickle look it up
        try:
            loader_spec.loader.exec_module(module)
        except BaseException as e:
            del sys.modules[mod_name]
            if not isinstance(e, Exception):
                raise
            raise ImportError(f"user module {spec!r} ({path}) failed to import: "
                              f"{type(e).__name__}: {e}") from e
        return module
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(spec)
    except Exception as e:
        raise ImportError(f"user module {spec!r} failed to import (looked in sys.path, which "
                          f"includes the working directory {cwd}): {type(e).__name__}: {e}") \
            from e


def import_user_modules(specs: Sequence[str]) -> list[types.ModuleType]:
    """Import user modules (:func:`import_user_module` each, in order), typically ones that
    call :func:`register_family`; returns them."""
    if isinstance(specs, str):
        raise TypeError("import_user_modules takes a list of module specs, not one string")
    return [import_user_module(s) for s in specs]


def split_task_name(full: str) -> tuple[TaskFamily, str]:
    if ":" not in full:
        raise ValueError(f"task names are 'family:name' (e.g. 'sop_synth:aircraft_inspection'),"
                         f" got {full!r}; families: {FAMILIES.names()}")
    fam_name, name = full.split(":", 1)
    fam = FAMILIES.get(fam_name)
    if not fam.has_task(name):
        known = fam.known_names()
        raise KeyError(f"unknown task {full!r};{did_you_mean(name, known)} {fam_name} has: "
                       f"{[f'{fam_name}:{n}' for n in known]}"
                       + (fam.hint() if fam.hint is not None else ""))
    return fam, name


def load_tasks(full_name: str, split: str = "train", n: int | None = None,
               seed: int = 0) -> list[Task]:
    """Tasks of ``family:name`` in ``split`` (the first ``n`` when given)."""
    fam, name = split_task_name(full_name)
    return fam.tasks(name, split, n, seed)


def reward_kinds(full_task_name: str) -> tuple[str, ...]:
    """The reward kinds of a task's family (``family`` or ``family:name``; only the family is
    consulted); the first is the default. For validating a recipe's reward when it loads."""
    return FAMILIES.get(full_task_name.split(":", 1)[0]).rewards


def make_env(task: Task, reward: str | None = None) -> Environment:
    """A fresh environment for one episode of ``task``, scoring with ``reward`` (one of its
    family's ``rewards``; ``None``: the family's default)."""
    fam = FAMILIES.get(task.family)
    return fam.make_env(task, fam.reward(reward))


def oracle_turns(task: Task) -> list[str]:
    fam = FAMILIES.get(task.family)
    if fam.oracle is None:
        raise ValueError(f"task family {fam.name!r} has no oracle (TaskFamily.oracle): "
                         "env-check needs the turns of a perfect agent")
    return fam.oracle(task)


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


def sop_bench_roots() -> list[str]:
    """The folders named by ``MTRL_SOP_BENCH_DIR`` (``os.pathsep``-separated), in order."""
    value = os.environ.get("MTRL_SOP_BENCH_DIR", "")
    return [os.path.expanduser(r) for r in value.split(os.pathsep) if r]


def sop_bench_folder(name: str) -> str | None:
    """The domain folder ``sop_bench:<name>`` means: ``<name>`` under the first root that has
    it, else ``<name>`` as a path (relative to the working directory); None if neither."""
    if name:
        for root in sop_bench_roots():
            if os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
        if os.path.isdir(os.path.expanduser(name)) and os.path.isfile(
                os.path.join(os.path.expanduser(name), "sop.txt")):
            return os.path.expanduser(name)
    return None


def sop_bench_names() -> list[str]:
    """The domain folders visible under the roots (the first root wins a repeated name)."""
    seen: dict[str, None] = {}
    for root in sop_bench_roots():
        if os.path.isdir(root):
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith((".", "_")):
                    seen.setdefault(entry.name)
    return list(seen)


def _sop_bench_hint() -> str:
    roots = sop_bench_roots()
    if not roots:
        return (". MTRL_SOP_BENCH_DIR is not set: set it to the folder holding your SOP-Bench-"
                "format domain folders (src/amazon_sop_bench/benchmarks/data in an "
                "amazon-science/SOP-Bench checkout), or name a domain folder by its path "
                "(sop_bench:./my_domain)")
    return (f" (the folders under MTRL_SOP_BENCH_DIR={os.pathsep.join(roots)}); or name a domain "
            "folder by its path (sop_bench:./my_domain)")


def sop_bench_domain(name: str) -> SopDomain:
    """The loaded domain ``sop_bench:<name>``, with its folder's ``tool_map.json`` or else the
    package's map for a SOP-Bench domain of that name. Cached until a file changes."""
    folder = sop_bench_folder(name)
    if folder is None:
        raise FileNotFoundError(f"SOP-Bench-format domain {name!r} not found"
                                f"{_sop_bench_hint()}")
    tool_map = os.path.join(folder, "tool_map.json")
    if not os.path.exists(tool_map):
        base = os.path.basename(os.path.normpath(folder))
        tool_map = os.path.join(SOP_MAPS, f"{base}.json")
        if not os.path.exists(tool_map):
            raise FileNotFoundError(
                f"SOP domain {folder}: no tool_map.json, and the package ships no map for a "
                f"domain named {base!r} (it has {list(SOP_BENCH_DOMAINS)}); write one (the "
                "format is in mtrl_jax/envs/sop.py)")
    return _load_domain(folder, tool_map, "sop_bench", _stamp(folder, tool_map))


def _stamp(folder: str, tool_map: str) -> tuple:
    """What the cached domain depends on: every file's name, size and modification time."""
    files = [e for e in os.scandir(folder) if e.is_file()]
    return tuple(sorted((e.path, e.stat().st_mtime_ns, e.stat().st_size) for e in files)) + (
        (tool_map, os.stat(tool_map).st_mtime_ns),)


@lru_cache(maxsize=16)
def _load_domain(folder: str, tool_map: str, family: str, stamp: tuple) -> SopDomain:
    return load_sop_domain(folder, family=family, tool_map=tool_map)


def _sop_bench_tasks(name, split, n, seed):
    folder = sop_bench_folder(name)
    if split == "train" and os.path.basename(os.path.normpath(folder or name)) in \
            SOP_BENCH_DOMAINS:
        raise ValueError("SOP-Bench is licensed for evaluation only (CC BY-NC 4.0): its "
                         "domains have no train split here. Train on sop_synth:* tasks, a "
                         "SOP-format domain of your own with a train_set_with_outputs.csv, or "
                         "a task family of your own.")
    tasks = sop_bench_domain(name).tasks(split)
    for t in tasks:
        t.name = name  # as the user named it (a path, maybe): make_env finds the folder again
    return tasks[:n] if n else tasks


register_family(TaskFamily(
    name="sop_bench", names=sop_bench_names, tasks=_sop_bench_tasks,
    make_env=lambda t, reward: SopEnvironment(sop_bench_domain(t.name), reward),
    oracle=lambda t: _sop_oracle(sop_bench_domain(t.name), t),
    rewards=SOP_REWARDS, has=lambda name: sop_bench_folder(name) is not None,
    hint=_sop_bench_hint))


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


register_family(TaskFamily(
    name="sop_synth", names=SYNTH_DOMAINS, tasks=_synth_tasks,
    make_env=lambda t, reward: SopEnvironment(synth_domain(t.name, t.data.get("seed", 0)),
                                              reward),
    oracle=lambda t: _sop_oracle(synth_domain(t.name, t.data.get("seed", 0)), t),
    rewards=SOP_REWARDS))

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


register_family(TaskFamily(
    name="math", names=("arith",), tasks=_math_tasks, make_env=lambda t, reward: MathEnvironment(),
    oracle=lambda t: [tool_call_text("calculator", {"expression": t.data["expression"]}),
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
        db = SQLiteSandbox(setup)
        try:
            rows: list = []
            while not rows:  # a name asked of an empty department has no answer: ask again
                q, ref = rng.choice(_QUESTIONS)
                params = {"dept": rng.choice(_DEPTS), "x": rng.randrange(40000, 140000, 5000),
                          "year": rng.randint(2008, 2022)}
                rows = db.query(ref.format(**params))["rows"]
        finally:
            db.close()
        value = 0 if rows[0][0] is None else rows[0][0]
        out.append(Task(id=f"sql/{split}/{i}", family="sql", name=name,
                        prompt=q.format(**params), system=SQL_SYSTEM,
                        expected={"answer": value},
                        data={"setup_sql": setup, "reference_sql": ref.format(**params)},
                        split=split))
    return out


def format_sql_result(result: dict[str, Any], max_rows: int) -> str:
    """What ``run_sql`` answers: the query result as JSON (blobs as hex); a result cut by the
    sandbox's row limit or byte budget starts with a ``note`` saying how many rows it shows
    and why (first, so a further cut of the text by the agent loop keeps it)."""
    if result.get("truncated"):
        shown = len(result["rows"])
        limit = (f"the {result['max_bytes']}-byte result budget"
                 if result.get("truncated_by") == "bytes" else f"the {max_rows}-row limit")
        result = {"note": (
            f"truncated: showing {shown} row{'' if shown == 1 else 's'}; the result has more "
            f"(cut at {limit}); narrow the query (WHERE, LIMIT, aggregates, fewer or shorter "
            "columns) to see the rest"), **result}
    return json.dumps(result, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))


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
                return format_sql_result(env.db.query(query), env.db.max_rows)
            except sqlite3.Error as e:
                return f"Error: {e}"

        return [run_sql]

    def reward(self, episode):
        episode.update_reward(*dense_reward(episode.final_text, episode.task.expected))


register_family(TaskFamily(
    name="sql", names=("employees",), tasks=_sql_tasks, make_env=lambda t, reward: SQLEnvironment(),
    oracle=lambda t: [tool_call_text("run_sql", {"query": t.data["reference_sql"]}),
                      final_output_text(t.expected)]))


def strict_task_score(task: Task, final_text: str | None) -> float:
    """The external evaluation of an answer to ``task``."""
    return strict_score(final_text, task.expected or {})
