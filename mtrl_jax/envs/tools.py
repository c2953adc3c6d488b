"""Tools: typed Python functions (sync or async) with a JSON schema, and argument validation.

A user writes plain functions::

    @tool
    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current weather of a city.

        Args:
          city: the city name.
          unit: temperature unit.
        '''

and the schema (name, description, parameter types, enums, required, per-argument
descriptions) is derived from the signature and docstring. Schemas may instead be given
explicitly, in OpenAI function format (``{"type": "function", "function": {...}}``) or Bedrock
``toolSpec`` format (``{"toolSpec": {"name", "description", "inputSchema": {"json": ...}}}``).

:func:`validate_arguments` checks a call's arguments against the schema (types, required,
enums, unknown keys) and returns readable errors that the agent loop shows to the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Literal

JSONSchema = dict[str, Any]

_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean",
               dict: "object", list: "array", type(None): "null"}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool the agent can call.

    Attributes:
      name, description: what the model sees.
      parameters: JSON schema of the arguments object.
      fn: the implementation (``None`` for schema-only tools answered by an environment),
        called with the validated arguments as keywords; may be ``async``.
    """

    name: str
    description: str
    parameters: JSONSchema
    fn: Callable[..., Any] | None = None

    def openai_schema(self) -> dict[str, Any]:
        """The OpenAI function format chat templates take as ``tools=[...]``."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}

    @property
    def is_async(self) -> bool:
        return self.fn is not None and inspect.iscoroutinefunction(self.fn)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's ``name``, its ``arguments`` object and the ``raw``
    text of the block it came from. Defined here, beside :class:`Tool`, so environments need
    nothing from the rollout side (``mtrl_jax.rollout.parsing`` builds these from model text)."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""


# ------------------------------------------------------------------------------ schemas


def _type_schema(annotation: Any, where: str) -> JSONSchema:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _PY_TO_JSON:
        return {"type": _PY_TO_JSON[annotation]}
    if origin is Literal:
        values = list(args)
        kinds = {type(v) for v in values}
        schema: JSONSchema = {"enum": values}
        if len(kinds) == 1 and next(iter(kinds)) in _PY_TO_JSON:
            schema["type"] = _PY_TO_JSON[next(iter(kinds))]
        return schema
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        out: JSONSchema = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _type_schema(args[0], where)
        return out
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return _type_schema(non_null[0], where)
        return {"anyOf": [_type_schema(a, where) for a in non_null]}
    raise TypeError(f"{where}: cannot derive a JSON schema for annotation {annotation!r}; "
                    "use str/int/float/bool/list/dict/Literal or pass an explicit schema")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Summary and ``Args:`` descriptions of a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    lines = doc.splitlines()
    summary_lines, arg_desc = [], {}
    i = 0
    while i < len(lines) and not re.match(r"^\s*(Args|Arguments|Parameters)\s*:\s*$", lines[i]):
        summary_lines.append(lines[i])
        i += 1
    current = None
    for line in lines[i + 1:]:
        if re.match(r"^\S.*:\s*$", line):  # next section (Returns:, Raises:)
            break
        m = re.match(r"^\s+(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
        if m:
            current = m.group(1)
            arg_desc[current] = m.group(3).strip()
        elif current and line.strip():
            arg_desc[current] += " " + line.strip()
    summary = " ".join(s.strip() for s in summary_lines if s.strip())
    return summary, arg_desc


def schema_from_function(fn: Callable[..., Any], name: str | None = None,
                         description: str | None = None) -> Tool:
    """Derive a :class:`Tool` from type hints and a Google-style docstring."""
    where = f"tool {getattr(fn, '__name__', fn)!r}"
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    summary, arg_desc = _docstring_parts(fn.__doc__ or "")
    props: dict[str, JSONSchema] = {}
    required = []
    for pname, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{where}: *args/**kwargs are not supported in tool signatures")
        if pname not in hints:
            raise TypeError(f"{where}: parameter {pname!r} needs a type annotation")
        schema = _type_schema(hints[pname], f"{where}, parameter {pname!r}")
        if pname in arg_desc:
            schema["description"] = arg_desc[pname]
        if param.default is param.empty:
            required.append(pname)
        else:
            schema["default"] = param.default
        props[pname] = schema
    params: JSONSchema = {"type": "object", "properties": props, "required": required,
                          "additionalProperties": False}
    return Tool(name or fn.__name__, description or summary, params, fn)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None, parameters: JSONSchema | None = None):
    """Decorator: ``@tool`` or ``@tool(name=..., parameters={...})`` -> :class:`Tool`."""

    def wrap(f):
        if parameters is not None:
            return Tool(name or f.__name__, description or _docstring_parts(f.__doc__ or "")[0],
                        parameters, f)
        return schema_from_function(f, name, description)

    return wrap(fn) if fn is not None else wrap


def tool_from_spec(spec: dict[str, Any], fn: Callable[..., Any] | None = None) -> Tool:
    """A :class:`Tool` from an OpenAI function schema or a Bedrock ``toolSpec``."""
    if "toolSpec" in spec:
        ts = spec["toolSpec"]
        schema = ts.get("inputSchema", {}).get("json", {"type": "object", "properties": {}})
        return Tool(ts["name"], ts.get("description", ""), schema, fn)
    if spec.get("type") == "function" and "function" in spec:
        f = spec["function"]
        return Tool(f["name"], f.get("description", ""),
                    f.get("parameters", {"type": "object", "properties": {}}), fn)
    if "name" in spec and ("parameters" in spec or "input_schema" in spec):
        return Tool(spec["name"], spec.get("description", ""),
                    spec.get("parameters") or spec.get("input_schema"), fn)
    raise ValueError(f"unrecognised tool spec (expected OpenAI 'function' or Bedrock "
                     f"'toolSpec' format): keys {sorted(spec)}")


# ------------------------------------------------------------------------------ validation

#: The deepest JSON nesting (brackets) accepted from model output: a tool call's object, its
#: arguments, a ``<final_output>`` answer. Deeper text is refused before ``json.loads`` with a
#: format error, so no recursion limit (parsing, ``json.dumps``, ``repr``, validation, chat
#: templates) can be reached from what a model writes.
MAX_JSON_DEPTH = 64

_NON_BRACKET_BYTES = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_DEPTH_CHUNK = 1 << 16


def json_text_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests brackets deeper than ``limit`` (brackets inside strings do
    not count). Linear time and no recursion: a pre-check before ``json.loads``. Exact for valid
    JSON; for invalid JSON the answer does not matter (``json.loads`` refuses it anyway)."""
    if text.count("[") + text.count("{") <= limit:  # the common case: a few brackets in all
        return False
    # Outside strings only: without its escaped backslashes and escaped quotes (a run of
    # backslashes loses its pairs, so what is left escapes the next character), every other
    # piece between quotes is a string's content (an unterminated string runs to the end).
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    outside = "".join(unescaped.split('"')[::2])
    brackets = outside.encode("utf-8", "ignore").translate(None, _NON_BRACKET_BYTES)
    depth = 0  # running bracket depth, scanned in chunks so that a deep prefix returns early
    for i in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = brackets[i:i + _DEPTH_CHUNK]
        if max(accumulate(map(_BRACKET_STEP.__getitem__, chunk), initial=depth)) > limit:
            return True
        depth += chunk.count(b"[") + chunk.count(b"{") - chunk.count(b"]") - chunk.count(b"}")
    return False


def nesting_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests dicts/lists/tuples deeper than ``limit`` (``[]`` is depth 1,
    a scalar 0); iterative, stops early, and terminates on cyclic structures."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list | tuple):
            children = v
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))
    return False


_REPR_LIMIT = 200


def _brief(value: Any) -> str:
    """``repr(value)`` for error messages: never recursion-deep, at most ~200 characters."""
    if nesting_exceeds(value):
        return f"<{type(value).__name__} nested deeper than {MAX_JSON_DEPTH} levels>"
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "..."


def _check(value: Any, schema: JSONSchema, path: str, errors: list[str], depth: int = 0) -> None:
    # ``depth``: how many objects/arrays deep ``value`` sits inside the arguments; bounded so
    # that a recursive schema cannot recurse as deep as a (non-parsed) value goes
    if depth > MAX_JSON_DEPTH:
        errors.append(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels")
        return
    if "anyOf" in schema:
        for sub in schema["anyOf"]:
            trial: list[str] = []
            _check(value, sub, path, trial, depth)
            if not trial:
                return
        errors.append(f"{path}: {_brief(value)} matches none of the allowed types")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {_brief(value)} is not one of {schema['enum']}")
        return
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(_is_type(value, k) for k in kinds):
        errors.append(f"{path}: expected {'/'.join(kinds)}, got {type(value).__name__} "
                      f"{_brief(value)}"[:200])
        return
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{path}: missing required argument {req!r}")
        if schema.get("additionalProperties") is False:
            for key in value:
                if key not in props:
                    errors.append(f"{path}: unknown argument {_brief(key)} "
                                  f"(valid: {sorted(props)})")
        for key, sub in props.items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}" if path else key, errors, depth + 1)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", errors, depth + 1)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "null":
        return value is None
    return True  # unknown type keywords are not enforced


def validate_arguments(tool_: Tool, arguments: Any) -> list[str]:
    """Errors of ``arguments`` against ``tool_.parameters`` (empty when valid)."""
    if not isinstance(arguments, dict):
        return [f"arguments must be a JSON object, got {type(arguments).__name__}"]
    errors: list[str] = []
    _check(arguments, tool_.parameters, "", errors)
    return [e.lstrip(": ") if e.startswith(": ") else e for e in errors]
