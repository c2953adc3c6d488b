"""SOP-style task domains in the SOP-Bench on-disk format, with replayed read-only tools.

A domain folder holds:

- ``sop.txt`` -- the standard operating procedure, given to the agent as its system prompt;
- ``toolspecs.json`` -- the tools, Bedrock ``toolSpec`` format;
- ``metadata.json`` -- ``input_columns`` and ``output_columns``;
- ``{split}_set_with_outputs.csv`` (``test_set_with_outputs.csv`` for SOP-Bench) -- one task per
  row: inputs, expected outputs, and the columns the tools read;
- ``tool_map.json`` -- how each tool answers (ours; SOP-Bench ships code instead, so this
  project keeps one mapping file per supported SOP-Bench domain in ``mtrl_jax/envs/sop_maps``):

.. code-block:: json

    {"key_column": "account_id",
     "tools": {"getAccountStatus": {
        "key_argument": "account_id",
        "returns": [["account_status", "account_status", "str"]],
        "must_equal": [["is_authenticated", "is_authenticated", "bool"]],
        "not_found": "Account {key} not found",
        "mismatch": "Validation failed for {arg}"}}}

  Each tool finds the row whose ``key_column`` equals the ``key_argument`` value (read-only
  replay: the same call always gets the same answer), checks that each ``must_equal``
  argument equals the row's value, and returns the ``returns`` columns (result key, column,
  type) as a JSON object in that order. Types: ``str``, ``int``, ``float``, ``bool`` (CSV
  ``True``/``False``), ``json`` (a JSON-encoded column), ``raw`` (the CSV text).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any

from mtrl_jax.envs.base import Environment, Task, ToolError
from mtrl_jax.envs.scoring import dense_reward, strict_score
from mtrl_jax.envs.tools import Tool, tool_from_spec

FINAL_OUTPUT_INSTRUCTIONS = (
    "When you have finished the procedure, reply with the final answer as a JSON object "
    "inside <final_output></final_output> tags, with exactly these keys: {keys}. "
    "Call the tools with <tool_call> blocks; do not guess values a tool can give you."
)


def convert(value: str, kind: str) -> Any:
    """A CSV cell as the given type (see the module docstring)."""
    if kind in ("str", "raw"):
        return value
    if kind == "bool":
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no", ""):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if kind == "int":
        return int(float(value))
    if kind == "float":
        return float(value)
    if kind == "json":
        return json.loads(value) if value.strip() else None
    raise ValueError(f"unknown column type {kind!r} (str, int, float, bool, json, raw)")


@dataclasses.dataclass(frozen=True)
class ToolMapping:
    name: str
    key_argument: str
    returns: tuple[tuple[str, str, str], ...]
    must_equal: tuple[tuple[str, str, str], ...] = ()
    not_found: str = "No record found for {key}"
    mismatch: str = "The value of {arg} does not match the records"


@dataclasses.dataclass
class SopDomain:
    """A loaded SOP domain: procedure, tools, columns and task rows."""

    name: str
    family: str
    path: str
    sop: str
    toolspecs: list[dict[str, Any]]
    input_columns: list[str]
    output_columns: list[str]
    key_column: str
    mappings: dict[str, ToolMapping]
    rows: dict[str, list[dict[str, str]]]  # split -> rows

    def tools(self) -> list[Tool]:
        return [tool_from_spec(s) for s in self.toolspecs]

    def task(self, row: dict[str, str], split: str, index: int) -> Task:
        inputs = {c: row[c] for c in self.input_columns}
        expected = {c: row[c] for c in self.output_columns}
        keys = ", ".join(f'"{c}"' for c in self.output_columns)
        system = self.sop.strip() + "\n\n" + FINAL_OUTPUT_INSTRUCTIONS.format(keys=keys)
        prompt = "Process this case:\n" + json.dumps(inputs, ensure_ascii=False)
        return Task(id=f"{self.name}/{split}/{index}", family=self.family, name=self.name,
                    prompt=prompt, system=system, expected=expected,
                    data={"row": row, "inputs": inputs}, split=split)

    def tasks(self, split: str = "test") -> list[Task]:
        if split not in self.rows:
            raise KeyError(f"domain {self.name!r} has no {split!r} split; it has "
                           f"{sorted(self.rows)}")
        return [self.task(r, split, i) for i, r in enumerate(self.rows[split])]


def load_sop_domain(path: str | os.PathLike, *, family: str = "sop",
                    tool_map: str | os.PathLike | dict[str, Any] | None = None,
                    name: str | None = None) -> SopDomain:
    """Load a domain folder (see the module docstring). ``tool_map`` overrides the folder's
    ``tool_map.json`` (a path or the parsed mapping); ``name`` defaults to the folder name."""
    path = os.fspath(path)
    name = name or os.path.basename(os.path.normpath(path))

    def read(fn):
        full = os.path.join(path, fn)
        if not os.path.exists(full):
            raise FileNotFoundError(f"SOP domain {name!r}: missing {fn} in {path}")
        return full

    with open(read("sop.txt")) as f:
        sop = f.read()
    with open(read("toolspecs.json")) as f:
        toolspecs = json.load(f)
    with open(read("metadata.json")) as f:
        meta = json.load(f)
    if tool_map is None:
        tool_map = read("tool_map.json")
    if not isinstance(tool_map, dict):
        with open(tool_map) as f:
            tool_map = json.load(f)
    rows = {}
    for split in ("train", "val", "test"):
        fn = os.path.join(path, f"{split}_set_with_outputs.csv")
        if os.path.exists(fn):
            with open(fn, newline="") as f:
                rows[split] = list(csv.DictReader(f))
    if not rows:
        raise FileNotFoundError(f"SOP domain {name!r}: no *_set_with_outputs.csv in {path}")
    spec_names = {tool_from_spec(s).name for s in toolspecs}
    mappings = {}
    for tname, m in tool_map["tools"].items():
        if tname not in spec_names:
            raise ValueError(f"{name}: tool_map names tool {tname!r}, not in toolspecs.json "
                             f"({sorted(spec_names)})")
        mappings[tname] = ToolMapping(
            tname, m["key_argument"], tuple(tuple(r) for r in m["returns"]),
            tuple(tuple(r) for r in m.get("must_equal", ())),
            m.get("not_found", ToolMapping.not_found), m.get("mismatch", ToolMapping.mismatch))
    missing = spec_names - set(mappings)
    if missing:
        raise ValueError(f"{name}: tool_map has no mapping for tool(s) {sorted(missing)}")
    columns = set(next(iter(rows.values()))[0]) if next(iter(rows.values())) else set()
    for m in mappings.values():
        for _, col, _ in m.returns + m.must_equal:
            if columns and col not in columns:
                raise ValueError(f"{name}: tool {m.name!r} reads column {col!r}, not in the CSV")
    return SopDomain(name, family, path, sop, toolspecs, list(meta["input_columns"]),
                     list(meta["output_columns"]), tool_map["key_column"], mappings, rows)


class SopEnvironment(Environment):
    """Read-only replay of a domain's tools for one task row; rewards from the scorers.

    ``reward_kind``: ``dense`` (per-field accuracy + format term) or ``strict``.
    """

    def __init__(self, domain: SopDomain, reward_kind: str = "dense",
                 tool_timeout_s: float = 5.0):
        self.domain = domain
        self.reward_kind = reward_kind
        self.tool_timeout_s = tool_timeout_s
        # every row of every split is a fixture: tools answer for any key, as in SOP-Bench
        self._index = {}
        for split_rows in domain.rows.values():
            for r in split_rows:
                self._index.setdefault(r[domain.key_column], r)

    def tools(self) -> list[Tool]:
        return self.domain.tools()

    async def invoke(self, tool: Tool, arguments: dict[str, Any]) -> Any:
        return answer_tool(self.domain, self._index, tool.name, arguments)

    def reward(self, episode) -> None:
        expected = episode.task.expected or {}
        if self.reward_kind == "strict":
            score = strict_score(episode.final_text, expected)
            episode.update_reward(score, {"strict": score})
        else:
            episode.update_reward(*dense_reward(episode.final_text, expected))


def answer_tool(domain: SopDomain, index: dict[str, dict[str, str]], name: str,
                arguments: dict[str, Any]) -> dict[str, Any]:
    """The replayed answer of tool ``name`` (raises :class:`ToolError` as the domain says)."""
    m = domain.mappings[name]
    key = arguments.get(m.key_argument)
    row = index.get(str(key)) if key is not None else None
    if row is None:
        raise ToolError(m.not_found.format(key=key, arg=m.key_argument))
    for arg, col, kind in m.must_equal:
        try:
            want = convert(row[col], kind)
        except (ValueError, json.JSONDecodeError):
            want = row[col]
        if arguments.get(arg) != want:
            raise ToolError(m.mismatch.format(key=key, arg=arg))
    return {out: convert(row[col], kind) for out, col, kind in m.returns}


def oracle_calls(domain: SopDomain, task: Task) -> list[dict[str, Any]]:
    """One correct call per tool: every argument filled from the task's row (by column name;
    ``must_equal`` arguments from their column)."""
    row = task.data["row"]
    calls = []
    for t in domain.tools():
        m = domain.mappings[t.name]
        args: dict[str, Any] = {}
        kinds = {a: (c, k) for a, c, k in m.must_equal}
        for prop, schema in t.parameters.get("properties", {}).items():
            if prop in kinds:
                col, kind = kinds[prop]
                args[prop] = convert(row[col], kind)
            elif prop == m.key_argument:
                args[prop] = row[domain.key_column]
            elif prop in row:
                args[prop] = _as_schema_type(row[prop], schema)
        calls.append({"name": t.name, "arguments": args})
    return calls


def _as_schema_type(value: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    try:
        if kind == "boolean":
            return convert(value, "bool")
        if kind == "integer":
            return int(float(value))
        if kind == "number":
            return float(value)
        if kind in ("array", "object"):
            parsed = json.loads(value)
            return parsed
    except (ValueError, json.JSONDecodeError):
        if kind == "array":
            return [v.strip() for v in value.split(",") if v.strip()]
    return value
