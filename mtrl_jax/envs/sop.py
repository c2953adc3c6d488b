"""SOP-style task domains in the SOP-Bench on-disk format, with replayed read-only tools.

A domain folder holds:

- ``sop.txt`` -- the standard operating procedure, given to the agent as its system prompt;
- ``toolspecs.json`` -- the tools, Bedrock ``toolSpec`` format;
- ``metadata.json`` -- ``input_columns`` and ``output_columns``;
- ``{split}_set_with_outputs.csv`` (``test_set_with_outputs.csv`` for SOP-Bench) -- one task per
  row: inputs, expected outputs, and the columns the tools read;
- ``tool_map.json`` -- how each tool answers (ours; SOP-Bench ships Python code instead, so this
  project keeps one mapping file per supported SOP-Bench domain in ``mtrl_jax/envs/sop_maps``,
  written from the benchmark's ``tools.py``; a domain folder's own ``tool_map.json`` wins).

A tool map is ``{"tools": {name: {...}}, "rows": "all" | "task", "source": "..."}``. ``rows``:
``all`` (default) -- tools answer from every row of every split, as in SOP-Bench; ``task`` --
only from the episode's own row (for domains whose keys repeat across rows). Per tool, applied
in this order:

- ``params``: argument names in the order of the tool's Python signature, and ``qualname``:
  a call with a missing or unknown argument fails with Python's ``TypeError`` wording
  (``Cls.tool() missing 1 required positional argument: 'x'``), as the benchmark's does;
- ``required``: ``[[arg, "truthy" | "not_none"], ...]`` -> ``missing`` message;
- ``preconditions``: arguments that must be truthy -> ``precondition_failed`` message;
- ``constant``: a fixed JSON result (``"{arg}"`` strings echo an argument), no lookup;
- ``match``: ``[[arg, column, type], ...]`` -- the first row whose columns all equal the
  arguments (Python ``==`` after converting the cell; missing cells never match, except that an
  ``*_or_null`` cell matches a ``null`` argument) -> ``not_found`` message (or
  ``not_found_result``, a result instead of an error);
- ``must_equal``: ``[[arg, column, type, message], ...]`` -> the message on inequality
  (``{value}`` is the argument's Python repr);
- ``result``: a fixed JSON result once the row is found, or ``returns``:
  ``[[key, source, type], ...]`` -> a JSON object in that order, where ``source`` is a column
  name, ``{"arg": name}`` (echo an argument), ``{"regex": pattern, "arg": name, "then": ...,
  "else": ...}`` (whether the argument matches; ``then``/``else`` default to true/false) or
  ``{"const": value}``; or ``returns_value``: ``[column, type]`` -> a bare JSON value.

The model reads ``json.dumps(result)`` (Python's defaults, as the benchmark), or
``Error: <message>``. Cell types: ``str``, ``int``, ``float``, ``bool``, ``json``,
``pyliteral`` (``ast.literal_eval``), ``raw`` (the cell's text, missing or not);
``str_or_null`` / ``int_or_null`` / ``float_or_null`` / ``bool_or_null`` / ``json_or_null`` (a
missing cell becomes JSON ``null``); ``str_or_empty`` / ``float_or_empty`` /
``str_float_or_empty`` (a missing cell becomes ``""``); ``nan_or_str`` (a missing cell becomes
``NaN``). "Missing" follows pandas' default NA strings (empty, ``None``, ``nan``, ``NA``...).

Loading validates everything a typo could silently break (:class:`SopFormatError`, naming the
file, the tool and the key, with a did-you-mean): map keys, entry shapes, cell types, argument
and column names; and the CSV files: the field count of every record, quoting, and every cell a
tool reads against the type the map declares for it (file, line and column in the message).
Tools run through :class:`~mtrl_jax.envs.base.Environment`'s guarded path: the tool timeout
applies, and a failure the map does not describe reaches the model as ``Error: ...``.
"""

from __future__ import annotations

import ast
import asyncio
import csv
import dataclasses
import difflib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from mtrl_jax.envs.base import Environment, Episode, Task, ToolError
from mtrl_jax.envs.scoring import REWARD_KINDS, score_episode
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

#: The reward kinds :class:`SopEnvironment` computes; the first is the default.
SOP_REWARDS = REWARD_KINDS  # dense (per-field accuracy + format) or strict


class SopFormatError(ValueError):
    """A domain folder, tool map or CSV file that does not follow the format (module docstring).
    The message names the file and, where there is one, the tool, key, line and column."""


def is_na(value: str) -> bool:
    return value in NA_STRINGS


class _Missing:
    """A missing cell: equal to nothing, like pandas' NaN in a row filter."""

    def __eq__(self, other):
        return False

    def __hash__(self):
        return 0

    def __repr__(self):
        return "MISSING"


MISSING = _Missing()


def _to_bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


#: Cell types that parse text; a missing cell is :data:`MISSING` (equal to nothing).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": lambda v: int(float(v)),
    "float": float,
    "bool": _to_bool,
    "json": json.loads,
    "pyliteral": ast.literal_eval,
}
#: Cell types whose missing cell is a value (``""``, ``NaN`` or ``None``) rather than MISSING.
_SPECIAL_TYPES = ("raw", "str_or_empty", "float_or_empty", "str_float_or_empty", "nan_or_str")
_NULL_TYPES = tuple(f"{k}_or_null" for k in ("str", "int", "float", "bool", "json"))
CELL_TYPES: tuple[str, ...] = (*_PARSERS, *_SPECIAL_TYPES, *_NULL_TYPES)
#: Types under which every cell parses: no need to check their columns' cells at load time.
_TEXT_TYPES = frozenset({"str", "raw", "str_or_empty", "nan_or_str", "str_or_null"})
REQUIRED_CHECKS = ("truthy", "not_none")


def convert(value: str, kind: str) -> Any:
    """A CSV cell as the given type (see the module docstring); raises ``ValueError`` (or
    ``SyntaxError`` for ``pyliteral``) when the cell does not parse."""
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
    if kind.endswith("_or_null") and kind in _NULL_TYPES:
        return None if is_na(value) else _PARSERS[kind[:-len("_or_null")]](value)
    if kind not in _PARSERS:
        raise ValueError(f"unknown cell type {kind!r}")
    return MISSING if is_na(value) else _PARSERS[kind](value)


@dataclasses.dataclass(frozen=True)
class ToolMapping:
    """One tool's declared behaviour (see the module docstring)."""

    name: str
    spec: dict[str, Any]

    def reads(self) -> Iterator[tuple[str, str, str]]:
        """``(column, type, key)`` for every cell this tool reads."""
        for _, col, kind in self.spec.get("match", []):
            yield col, kind, "match"
        for m in self.spec.get("must_equal", []):
            yield m[1], m[2], "must_equal"
        for _, src, kind in self.spec.get("returns", []):
            if isinstance(src, str):
                yield src, kind, "returns"
        if "returns_value" in self.spec:
            yield self.spec["returns_value"][0], self.spec["returns_value"][1], "returns_value"

    def columns(self) -> set[str]:
        return {col for col, _, _ in self.reads()}


# ------------------------------------------------------------------------------ tool maps

_TOP_KEYS = ("tools", "rows", "source", "description")
_TOOL_KEYS = ("params", "qualname", "required", "missing", "preconditions", "precondition_failed",
              "constant", "match", "not_found", "not_found_result", "must_equal", "result",
              "returns", "returns_value")
_SOURCE_KEYS = ("arg", "regex", "then", "else", "const")


def did_you_mean(word: str, valid: Any) -> str:
    """`` Did you mean 'x'?`` for the valid name closest to a misspelt one, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _unknown(what: str, word: Any, valid: Any) -> str:
    return f"unknown {what} {word!r}.{did_you_mean(word, valid)} Valid: {sorted(valid)}"


def validate_tool_map(tool_map: Any, where: str, tools: dict[str, Tool] | None = None) -> None:
    """Check a parsed tool map (module docstring); raise :class:`SopFormatError` naming
    ``where`` (the map file), the tool and the key. With ``tools`` (the domain's tool specs),
    also check that the map covers exactly those tools and names only their arguments."""
    if not isinstance(tool_map, dict):
        raise SopFormatError(f"{where}: a tool map is a JSON object with a 'tools' object, got "
                             f"{type(tool_map).__name__}")
    for key in tool_map:
        if key not in _TOP_KEYS:
            raise SopFormatError(f"{where}: {_unknown('top-level key', key, _TOP_KEYS)}")
    if not isinstance(tool_map.get("tools"), dict):
        raise SopFormatError(f"{where}: needs a 'tools' object (tool name -> mapping)")
    if tool_map.get("rows", "all") not in ("all", "task"):
        raise SopFormatError(f"{where}: 'rows' must be 'all' or 'task', got "
                             f"{tool_map['rows']!r}")
    for tname, spec in tool_map["tools"].items():
        if tools is not None and tname not in tools:
            raise SopFormatError(f"{where}: tool {tname!r} is not in toolspecs.json."
                                 f"{did_you_mean(tname, tools)} Tools: {sorted(tools)}")
        _validate_tool(spec, f"{where}: tool {tname!r}", tools[tname] if tools else None)
    if tools is not None:
        missing = sorted(set(tools) - set(tool_map["tools"]))
        if missing:
            raise SopFormatError(f"{where}: no mapping for tool(s) {missing} of toolspecs.json")


def _validate_tool(spec: Any, where: str, tool: Tool | None) -> None:
    if not isinstance(spec, dict):
        raise SopFormatError(f"{where}: a mapping is a JSON object, got {spec!r}")
    for key in spec:
        if key not in _TOOL_KEYS:
            raise SopFormatError(f"{where}: {_unknown('key', key, _TOOL_KEYS)}")

    def fail(key: str, msg: str) -> SopFormatError:
        return SopFormatError(f"{where}: {key}: {msg}")

    def str_list(key: str) -> list[str]:
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(key, f"must be a list of strings, got {value!r}")
        return value

    def entries(key: str, shape: str) -> list[list[Any]]:
        """A list of fixed-length string lists (``shape`` names the items)."""
        value = spec.get(key, [])
        n = len(shape.split(","))
        if not isinstance(value, list):
            raise fail(key, f"must be a list of [{shape}], got {value!r}")
        for i, e in enumerate(value):
            ok = isinstance(e, list) and len(e) == n and all(
                isinstance(x, str) or (key == "returns" and j == 1 and isinstance(x, dict))
                for j, x in enumerate(e))
            if not ok:
                raise fail(f"{key}[{i}]", f"must be [{shape}], got {e!r}")
        return value

    def cell_type(key: str, kind: str) -> None:
        if kind not in CELL_TYPES:
            raise fail(key, _unknown("cell type", kind, CELL_TYPES))

    for key in ("qualname", "missing", "precondition_failed", "not_found"):
        if key in spec and not isinstance(spec[key], str):
            raise fail(key, f"must be a string, got {spec[key]!r}")
    params = str_list("params") if "params" in spec else None
    args_used: list[tuple[str, str]] = [(f"preconditions[{i}]", a) for i, a in
                                        enumerate(str_list("preconditions"))]
    for i, (arg, check) in enumerate(entries("required", "arg, check")):
        args_used.append((f"required[{i}]", arg))
        if check not in REQUIRED_CHECKS:
            raise fail(f"required[{i}]", _unknown("check", check, REQUIRED_CHECKS))
    for i, (arg, _, kind) in enumerate(entries("match", "arg, column, type")):
        args_used.append((f"match[{i}]", arg))
        cell_type(f"match[{i}]", kind)
    for i, (arg, _, kind, _) in enumerate(entries("must_equal", "arg, column, type, message")):
        args_used.append((f"must_equal[{i}]", arg))
        cell_type(f"must_equal[{i}]", kind)
    for i, (_, src, kind) in enumerate(entries("returns", "key, column or source, type")):
        cell_type(f"returns[{i}]", kind)
        if isinstance(src, dict):
            args_used += _validate_source(src, f"returns[{i}]", fail)
    if "returns_value" in spec:
        rv = spec["returns_value"]
        if not (isinstance(rv, list) and len(rv) == 2 and all(isinstance(x, str) for x in rv)):
            raise fail("returns_value", f"must be [column, type], got {rv!r}")
        cell_type("returns_value", rv[1])
    if "constant" not in spec:
        if "match" not in spec:
            raise SopFormatError(f"{where}: needs 'match' (or 'constant')")
        if not {"result", "returns", "returns_value"} & set(spec):
            raise SopFormatError(f"{where}: needs 'returns', 'returns_value' or 'result' "
                                 "(what to answer once the row is found)")
    # an argument name the model can never send (a typo) would silently never match
    valid = params if params is not None else (
        list(tool.parameters.get("properties", {})) if tool is not None else None)
    if valid is not None:
        source = "params" if params is not None else "the tool's input schema"
        for key, arg in args_used:
            if arg not in valid:
                raise fail(key, f"argument {arg!r} is not in {source} {valid}."
                           f"{did_you_mean(arg, valid)}")


def _validate_source(src: dict[str, Any], key: str,
                     fail: Callable[[str, str], SopFormatError]) -> list[tuple[str, str]]:
    for k in src:
        if k not in _SOURCE_KEYS:
            raise fail(key, _unknown("result source key", k, _SOURCE_KEYS))
    if "const" in src:
        return []
    if not isinstance(src.get("arg"), str):
        raise fail(key, f"a result source needs 'arg' (an argument name) or 'const', got {src!r}")
    if "regex" in src:
        try:
            re.compile(src["regex"])
        except (re.error, TypeError) as e:
            raise fail(key, f"bad regex {src['regex']!r}: {e}") from None
    return [(key, src["arg"])]


# ------------------------------------------------------------------------------ tools


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


def _cell(row: dict[str, str], col: str, kind: str) -> Any:
    """A cell a tool returns; a missing cell of a type with no missing value is an error (the
    map should declare ``*_or_null`` or ``*_or_empty``), not an object ``json`` cannot write."""
    value = convert(row[col], kind)
    if value is MISSING:
        raise ValueError(f"column {col!r} is empty in this row and its type {kind!r} has no "
                         f"value for an empty cell (declare {kind}_or_null in the tool map)")
    return value


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
    # Every cell of a matched column parses as its type (checked when the domain loads), so a
    # conversion here cannot fail on data and needs no per-row guard.
    row = next((r for r in rows if all(arguments.get(arg) == convert(r[col], kind)
                                       for arg, col, kind in spec["match"])), None)
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
        return _cell(row, *spec["returns_value"])
    return {key: _source(src, kind, row, arguments) for key, src, kind in spec["returns"]}


def _source(src: str | dict[str, Any], kind: str, row: dict[str, str],
            arguments: dict[str, Any]) -> Any:
    if isinstance(src, str):
        return _cell(row, src, kind)
    if "const" in src:
        return src["const"]
    if "regex" in src:
        hit = bool(re.match(src["regex"], str(arguments.get(src["arg"], ""))))
        return src.get("then", True) if hit else src.get("else", False)
    return arguments.get(src["arg"])


# ------------------------------------------------------------------------------ CSV files


def read_task_csv(path: str) -> tuple[list[dict[str, str]], list[int]]:
    """The rows of a task CSV and the line each starts on; :class:`SopFormatError` (file, line,
    column) for a record with more or fewer fields than the header or a broken quote."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise SopFormatError(f"{path}: empty file (no header row)") from None
    except csv.Error as e:
        raise SopFormatError(f"{path}:1: header: {e}") from None
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise SopFormatError(f"{path}:1: duplicate column name(s) {dup}")
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise SopFormatError(_quote_error(path, text, header, start, str(e))) from None
        end = reader.line_num
        if fields:  # blank lines are skipped, as csv.DictReader and pandas do
            if len(fields) != len(header):
                raise SopFormatError(_count_error(path, header, fields, start, end))
            rows.append(dict(zip(header, fields, strict=True)))
            lines.append(start)
        start = end + 1
    return rows, lines


def _count_error(path: str, header: list[str], fields: list[str], start: int, end: int) -> str:
    where = f"{path}:{start}"
    if len(fields) > len(header):
        what = (f"{len(fields)} fields but the header has {len(header)}: extra value "
                f"{fields[len(header)]!r} after column {header[-1]!r}")
    else:
        what = (f"{len(fields)} fields but the header has {len(header)}: no value for column "
                f"{header[len(fields)]!r}" + (" and after" if len(header) - len(fields) > 1
                                              else ""))
    if end > start:  # a record over several lines: most often a quote opened by mistake
        what += f" (the record runs over lines {start}-{end}: an unbalanced quote?)"
    return f"{where}: {what}"


def _quote_error(path: str, text: str, header: list[str], start: int, message: str) -> str:
    """Name the line and column of the quote that broke the record starting on ``start``."""
    lines = text.splitlines(keepends=True)
    field, in_quotes, field_start, after_close, open_line = 0, False, True, False, start
    for ln in range(start, len(lines) + 1):
        for ch in lines[ln - 1]:
            if in_quotes:
                if ch == '"':
                    in_quotes, after_close = False, True
                continue
            if after_close and ch == '"':  # a doubled quote inside a quoted field
                in_quotes, after_close = True, False
                continue
            if ch == ",":
                field, field_start, after_close = field + 1, True, False
                continue
            if ch in "\r\n":
                break
            if after_close:
                return (f"{path}:{ln}: column {_column(header, field)}: text after the closing "
                        f"quote of a quoted field ({message})")
            if ch == '"' and field_start:
                in_quotes, open_line = True, ln
            field_start = False
        else:
            continue
        if not in_quotes:
            break
    if in_quotes:
        return (f"{path}:{open_line}: column {_column(header, field)}: unbalanced quote: the "
                f"quoted field runs to the end of the file ({message})")
    return f"{path}:{start}: {message}"


def _column(header: list[str], index: int) -> str:
    return repr(header[index]) if index < len(header) else f"#{index + 1} (beyond the header)"


def _check_cells(path: str, rows: list[dict[str, str]], lines: list[int],
                 mappings: dict[str, ToolMapping]) -> None:
    """Every cell a tool reads parses as the type the map declares for it.

    A missing cell (pandas' NA strings) is accepted under every type: SOP-Bench's own data
    leaves typed columns empty where a record has no value (customer_service's session_token
    and service_area_code, matched as ``str``), and the benchmark's pandas tools see NaN there,
    which equals nothing: the row is simply never found by that column. ``convert`` reproduces
    that (``MISSING``; ``None`` for ``*_or_null``). Any other cell that does not parse would make
    the benchmark's tool behave differently from ours (pandas reads such a column as text, so no
    row matches a typed argument at all), so it is a data error, reported here rather than
    skipped at call time. Checked against the three SOP-Bench domains and the synthetic ones:
    every non-missing cell they read parses.
    """
    reads = {(col, kind): (m.name, key) for m in mappings.values()
             for col, kind, key in m.reads() if kind not in _TEXT_TYPES}
    for (col, kind), (tool, key) in sorted(reads.items()):
        for row, line in zip(rows, lines, strict=True):
            value = row[col]
            try:
                convert(value, kind)
            except (ValueError, SyntaxError, TypeError, RecursionError) as e:
                raise SopFormatError(
                    f"{path}:{line}: column {col!r}: {value[:80]!r} is not "
                    f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} (tool "
                    f"{tool!r} reads this column as {kind} in {key!r}): "
                    f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------ domains


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
    map_path: str | None = None  # the tool map's file (None: given as a dict)

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


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SopFormatError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def load_sop_domain(path: str | os.PathLike, *, family: str = "sop",
                    tool_map: str | os.PathLike | dict[str, Any] | None = None,
                    name: str | None = None) -> SopDomain:
    """Load and validate a domain folder (see the module docstring). ``tool_map`` overrides the
    folder's ``tool_map.json`` (a path or the parsed mapping); ``name`` defaults to the folder
    name. Raises :class:`SopFormatError` for a malformed folder, map or CSV."""
    path = os.fspath(path)
    name = name or os.path.basename(os.path.normpath(path))

    def need(fn: str) -> str:
        full = os.path.join(path, fn)
        if not os.path.exists(full):
            raise FileNotFoundError(f"SOP domain {name!r}: missing {fn} in {path}")
        return full

    with open(need("sop.txt"), encoding="utf-8") as f:
        sop = f.read()
    specs_path = need("toolspecs.json")
    toolspecs = _read_json(specs_path)
    try:
        tools = {t.name: t for t in (tool_from_spec(s) for s in toolspecs)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SopFormatError(f"{specs_path}: not a list of Bedrock toolSpec objects ({e})") \
            from None
    meta_path = need("metadata.json")
    meta = _read_json(meta_path)
    for key in ("input_columns", "output_columns"):
        if not isinstance(meta, dict) or not isinstance(meta.get(key), list):
            raise SopFormatError(f"{meta_path}: needs {key!r}, a list of column names")

    map_path = None
    if tool_map is None:
        tool_map = need("tool_map.json")
    if not isinstance(tool_map, dict):
        map_path = os.fspath(tool_map)
        tool_map = _read_json(map_path)
    where = map_path or f"tool map of domain {name!r}"
    validate_tool_map(tool_map, where, tools)
    mappings = {t: ToolMapping(t, m) for t, m in tool_map["tools"].items()}

    rows = {}
    for split in ("train", "val", "test"):
        fn = os.path.join(path, f"{split}_set_with_outputs.csv")
        if not os.path.exists(fn):
            continue
        rows[split], lines = read_task_csv(fn)
        header = list(rows[split][0]) if rows[split] else _header(fn)
        for m in mappings.values():
            for col, _, key in m.reads():
                if col not in header:
                    raise SopFormatError(
                        f"{where}: tool {m.name!r}: {key} reads column {col!r}, not in {fn}."
                        f"{did_you_mean(col, header)}")
        for key in ("input_columns", "output_columns"):
            for col in meta[key]:
                if col not in header:
                    raise SopFormatError(f"{meta_path}: {key} names column {col!r}, not in {fn}."
                                         f"{did_you_mean(col, header)}")
        _check_cells(fn, rows[split], lines, mappings)
    if not rows:
        raise FileNotFoundError(f"SOP domain {name!r}: no *_set_with_outputs.csv in {path}")
    return SopDomain(name, family, path, sop, toolspecs, list(meta["input_columns"]),
                     list(meta["output_columns"]), mappings, rows,
                     tool_map.get("rows", "all"), map_path)


def _header(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


class SopEnvironment(Environment):
    """Read-only replay of a domain's tools for one task; rewards from the scorers.

    Every row of every split is a fixture (tools answer for any key, as in SOP-Bench) unless the
    map says ``"rows": "task"``. Calls are not validated against the JSON schema first
    (``validate_schema = False``): the mapping reproduces the benchmark's own checks and
    messages. ``reward_kind``: ``dense`` (per-field accuracy + format) or ``strict``.
    """

    validate_schema = False

    def __init__(self, domain: SopDomain, reward_kind: str = "dense",
                 tool_timeout_s: float = 5.0):
        if reward_kind not in SOP_REWARDS:
            raise ValueError(f"unknown SOP reward {reward_kind!r}; valid: {list(SOP_REWARDS)}")
        self.domain = domain
        self.reward_kind = reward_kind
        self.tool_timeout_s = tool_timeout_s
        self._rows = [r for split_rows in domain.rows.values() for r in split_rows]

    async def setup(self, task: Task) -> None:
        self.task = task
        if self.domain.rows_scope == "task":
            self._rows = [task.data["row"]]

    def tools(self) -> list[Tool]:
        return self.domain.tools()

    def unknown_tool_message(self, name: str) -> str:
        # SOP-Bench's wording, listing the tools in toolspecs.json order
        return (f"Tool '{name}' not found. Available tools: "
                f"{', '.join(s['toolSpec']['name'] for s in self.domain.toolspecs)}")

    async def invoke(self, tool: Tool, arguments: dict[str, Any]) -> str:
        """The mapped answer as the model reads it (``json.dumps``), computed in a thread so the
        base class's timeout can interrupt the wait on a large table."""
        mapping = self.domain.mappings[tool.name]
        return await asyncio.to_thread(
            lambda: json.dumps(run_mapping(mapping, self._rows, arguments)))

    def reward(self, episode: Episode) -> None:
        score_episode(episode, self.reward_kind)


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
