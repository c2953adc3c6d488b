"""SOP-style task domains in the SOP-Bench on-disk format, with replayed read-only tools.

A domain folder holds:

- ``sop.txt`` -- the standard operating procedure, given to the agent as its system prompt;
- ``toolspecs.json`` -- the tools, Bedrock ``toolSpec`` format;
- ``metadata.json`` -- ``input_columns`` and ``output_columns``;
- ``{split}_set_with_outputs.csv`` (``test_set_with_outputs.csv`` for SOP-Bench) -- one task per
  row: inputs, expected outputs, and the columns the tools read;
- ``tool_map.json`` -- how each tool answers (ours; SOP-Bench ships Python code instead, so this
  project keeps one mapping file per supported SOP-Bench domain in ``mtrl_jax/envs/sop_maps``,
  written from the benchmark's ``tools.py``). Per tool, applied in this order:

  - ``params``: argument names in the order of the tool's Python signature, and ``qualname``:
    a call with a missing or unknown argument fails with Python's ``TypeError`` wording
    (``Cls.tool() missing 1 required positional argument: 'x'``), as the benchmark's does;
  - ``required``: ``[[arg, "truthy" | "not_none"], ...]`` -> ``missing`` message;
  - ``preconditions``: arguments that must be truthy -> ``precondition_failed`` message;
  - ``constant``: a fixed JSON result (``"{arg}"`` strings echo an argument), no lookup;
  - ``match``: ``[[arg, column, type], ...]`` -- the first row whose columns all equal the
    arguments (Python ``==`` after converting the cell; missing cells never match) ->
    ``not_found`` message (or ``not_found_result``, a result instead of an error);
  - ``must_equal``: ``[[arg, column, type, message], ...]`` -> the message on inequality
    (``{value}`` is the argument's Python repr);
  - ``returns``: ``[[key, column, type], ...]`` -> a JSON object in that order (a column
    ``"=arg:name"`` echoes an argument, ``"=regex:arg:pattern"`` is whether it matches), or
    ``returns_value``: ``[column, type]`` -> a bare JSON value.

  The model reads ``json.dumps(result)`` (Python's defaults, as the benchmark), or
  ``Error: <message>``. Cell types: ``str``, ``int``, ``float``, ``bool``, ``json``,
  ``pyliteral`` (``ast.literal_eval``), ``str_or_empty`` / ``float_or_empty`` /
  ``str_float_or_empty`` (a missing cell becomes ``""``), ``nan_or_str`` (a missing cell becomes
  ``NaN``). "Missing" follows pandas' default NA strings (empty, ``None``, ``nan``, ``NA``...).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import re
from typing import Any

from mtrl_jax.envs.base import Environment, Task, ToolError
from mtrl_jax.envs.scoring import dense_reward, strict_score
from mtrl_jax.envs.tools import Tool, tool_from_spec

FINAL_OUTPUT_INSTRUCTIONS = (
    "When you have finished the procedure, reply with the final answer as a JSON object "
    "inside <final_output></final_output> tags, with exactly these keys: {keys}. "
    "Call the tools with <tool_call> blocks; do not guess values a tool can give you."
)


#: pandas' default NA strings: cells SOP-Bench's tools see as NaN.
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                        "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                        "nan", "null"})


def is_na(value: str) -> bool:
    return value in NA_STRINGS


class _Missing:
    """A missing cell: equal to nothing, like pandas' NaN in a row filter."""

    def __eq__(self, other):
        return False

    def __hash__(self):
        return 0


MISSING = _Missing()


def convert(value: str, kind: str) -> Any:
    """A CSV cell as the given type (see the module docstring)."""
    if kind == "raw":
        return value
    if kind == "str_or_empty":
        return "" if is_na(value) else value
    if kind == "float_or_empty":
        return "" if is_na(value) else float(value)
    if kind == "str_float_or_empty":
        return "" if is_na(value) else str(float(value))
    if kind == "nan_or_str":
        return float("nan") if is_na(value) else value
    if is_na(value) and kind != "str":
        return MISSING
    if kind == "str":
        return MISSING if is_na(value) else value
    if kind == "bool":
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if kind == "int":
        return int(float(value))
    if kind == "float":
        return float(value)
    if kind == "json":
        return json.loads(value)
    if kind == "pyliteral":
        return ast.literal_eval(value)
    raise ValueError(f"unknown column type {kind!r}")


@dataclasses.dataclass(frozen=True)
class ToolMapping:
    """One tool's declared behaviour (see the module docstring)."""

    name: str
    spec: dict[str, Any]

    def columns(self) -> set[str]:
        cols = {c for _, c, _ in self.spec.get("match", [])}
        cols |= {m[1] for m in self.spec.get("must_equal", [])}
        cols |= {c for _, c, _ in self.spec.get("returns", []) if isinstance(c, str)}
        if "returns_value" in self.spec:
            cols.add(self.spec["returns_value"][0])
        return cols


def _type_error(m: ToolMapping, arguments: dict[str, Any]) -> str | None:
    params = m.spec.get("params")
    if params is None:
        return None
    qual = m.spec.get("qualname", m.name)
    for key in arguments:
        if key not in params:
            return f"{qual}() got an unexpected keyword argument {key!r}"
    missing = [p for p in params if p not in arguments]
    if missing:
        names = [repr(p) for p in missing]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        plural = "argument" if len(missing) == 1 else "arguments"
        return f"{qual}() missing {len(missing)} required positional {plural}: {listed}"
    return None


def _fill(template: Any, arguments: dict[str, Any]) -> Any:
    if isinstance(template, str) and template.startswith("{") and template.endswith("}") \
            and template[1:-1] in arguments:
        return arguments[template[1:-1]]
    if isinstance(template, dict):
        return {k: _fill(v, arguments) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, arguments) for v in template]
    if isinstance(template, str):
        return template.format(**{k: v for k, v in arguments.items()})
    return template


def run_mapping(m: ToolMapping, rows: list[dict[str, str]], arguments: dict[str, Any]) -> Any:
    """The result of tool ``m`` for ``arguments`` over the domain's ``rows``; raises
    :class:`ToolError` with the domain's message on failure."""
    spec = m.spec
    err = _type_error(m, arguments)
    if err:
        raise ToolError(err)
    for arg, check in spec.get("required", []):
        val = arguments.get(arg)
        if (check == "truthy" and not val) or (check == "not_none" and val is None):
            raise ToolError(spec.get("missing", "Missing required parameters"))
    for arg in spec.get("preconditions", []):
        if not arguments.get(arg):
            raise ToolError(spec.get("precondition_failed", "Precondition failed"))
    if "constant" in spec:
        return _fill(spec["constant"], arguments)
    row = None
    for r in rows:
        try:
            if all(arguments.get(arg) == convert(r[col], kind) for arg, col, kind in
                   spec["match"]):
                row = r
                break
        except (ValueError, SyntaxError, json.JSONDecodeError):
            continue
    if row is None:
        if "not_found_result" in spec:
            return _fill(spec["not_found_result"], arguments)
        raise ToolError(_fill(spec.get("not_found", "No record found"), arguments))
    for arg, col, kind, message in spec.get("must_equal", []):
        val = arguments.get(arg)
        if isinstance(val, str) and kind == "pyliteral":
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError) as e:
                raise ToolError(str(e)) from None
        if val != convert(row[col], kind):
            raise ToolError(message.format(value=val))
    if "result" in spec:
        return _fill(spec["result"], arguments)
    if "returns_value" in spec:
        col, kind = spec["returns_value"]
        return convert(row[col], kind)
    return {key: _source(src, kind, row, arguments) for key, src, kind in spec["returns"]}


def _source(src: str | dict[str, Any], kind: str, row: dict[str, str],
            arguments: dict[str, Any]) -> Any:
    if isinstance(src, str):
        return convert(row[src], kind)
    if "arg" in src and "regex" not in src:
        return arguments.get(src["arg"])
    if "regex" in src:
        hit = bool(re.match(src["regex"], str(arguments.get(src["arg"], ""))))
        return src.get("then", True) if hit else src.get("else", False)
    if "const" in src:
        return src["const"]
    raise ValueError(f"unknown result source {src!r}")


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
    mappings: dict[str, ToolMapping]
    rows: dict[str, list[dict[str, str]]]  # split -> rows
    rows_scope: str = "all"  # "all": tools answer from every row; "task": the episode's row

    def tools(self) -> list[Tool]:
        return [tool_from_spec(s) for s in self.toolspecs]

    def task(self, row: dict[str, str], split: str, index: int) -> Task:
        # inputs in CSV column order, "key: value" lines, missing cells as "nan" (as SOP-Bench)
        inputs = {c: row[c] for c in row if c in self.input_columns}
        expected = {c: row[c] for c in self.output_columns}
        keys = ", ".join(f'"{c}"' for c in self.output_columns)
        system = self.sop.strip() + "\n\n" + FINAL_OUTPUT_INSTRUCTIONS.format(keys=keys)
        prompt = "Process this task according to the SOP:\n\n" + "\n".join(
            f"{k}: {'nan' if is_na(v) else v}" for k, v in inputs.items())
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
        if "constant" not in m and "match" not in m:
            raise ValueError(f"{name}: tool {tname!r} needs 'match' (or 'constant')")
        mappings[tname] = ToolMapping(tname, m)
    missing = spec_names - set(mappings)
    if missing:
        raise ValueError(f"{name}: tool_map has no mapping for tool(s) {sorted(missing)}")
    first_rows = next(iter(rows.values()))
    columns = set(first_rows[0]) if first_rows else set()
    for m in mappings.values():
        for col in m.columns():
            if columns and col not in columns:
                raise ValueError(f"{name}: tool {m.name!r} reads column {col!r}, not in the CSV")
    scope = tool_map.get("rows", "all")
    if scope not in ("all", "task"):
        raise ValueError(f"{name}: tool_map 'rows' must be 'all' or 'task', got {scope!r}")
    return SopDomain(name, family, path, sop, toolspecs, list(meta["input_columns"]),
                     list(meta["output_columns"]), mappings, rows, scope)


class SopEnvironment(Environment):
    """Read-only replay of a domain's tools for one task; rewards from the scorers.

    Every row of every split is a fixture (tools answer for any key, as in SOP-Bench). Calls are
    not validated against the JSON schema first: the mapping reproduces the benchmark's own
    checks and messages. ``reward_kind``: ``dense`` (per-field accuracy + format) or ``strict``.
    """

    def __init__(self, domain: SopDomain, reward_kind: str = "dense",
                 tool_timeout_s: float = 5.0):
        self.domain = domain
        self.reward_kind = reward_kind
        self.tool_timeout_s = tool_timeout_s
        self._rows = [r for split_rows in domain.rows.values() for r in split_rows]

    async def setup(self, task) -> None:
        self.task = task
        if self.domain.rows_scope == "task":
            self._rows = [task.data["row"]]

    def tools(self) -> list[Tool]:
        return self.domain.tools()

    async def call_tool(self, call) -> str:
        if call.name not in self.domain.mappings:
            raise ToolError(f"Tool '{call.name}' not found. Available tools: "
                            f"{', '.join(s['toolSpec']['name'] for s in self.domain.toolspecs)}")
        result = run_mapping(self.domain.mappings[call.name], self._rows, dict(call.arguments))
        return json.dumps(result)

    def reward(self, episode) -> None:
        expected = episode.task.expected or {}
        if self.reward_kind == "strict":
            score = strict_score(episode.final_text, expected)
            episode.update_reward(score, {"strict": score})
        else:
            episode.update_reward(*dense_reward(episode.final_text, expected))


def oracle_calls(domain: SopDomain, task: Task) -> list[dict[str, Any]]:
    """One call per tool with every argument taken from the task's row: a ``match`` or
    ``must_equal`` argument from its column (typed as the mapping says), any other from the
    column of the same name, typed by the tool's JSON schema."""
    row = task.data["row"]
    calls = []
    for t in domain.tools():
        spec = domain.mappings[t.name].spec
        typed = {arg: (col, kind) for arg, col, kind in spec.get("match", [])}
        typed.update({m[0]: (m[1], m[2]) for m in spec.get("must_equal", [])})
        args: dict[str, Any] = {}
        for prop, schema in t.parameters.get("properties", {}).items():
            if prop in typed:
                col, kind = typed[prop]
                value = convert(row[col], kind)
                args[prop] = None if value is MISSING else value
            elif prop in row:
                args[prop] = _as_schema_type(row[prop], schema)
        calls.append({"name": t.name, "arguments": args})
    return calls


def _as_schema_type(value: str, schema: dict[str, Any]) -> Any:
    if is_na(value):
        return None
    kind = schema.get("type")
    try:
        if kind == "boolean":
            return convert(value, "bool")
        if kind == "integer":
            return int(float(value))
        if kind == "number":
            return float(value)
        if kind in ("array", "object"):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if kind == "array":
            return [v.strip() for v in value.split(",") if v.strip()]
    return value
