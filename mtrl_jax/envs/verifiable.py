"""Verifiable execution: a safe arithmetic evaluator, a locked-down in-memory SQLite database,
and Python code run under OS-level isolation (re-exported from :mod:`mtrl_jax.envs.code_sandbox`).

These back environments whose outcome is checked by execution rather than judged: the agent's
arithmetic, SQL or code is run and its result compared with the task's.
"""

from __future__ import annotations

import ast
import math
import operator
import sqlite3
import time
from typing import Any

# ---------------------------------------------------------------------------------- safe math


class MathError(ValueError):
    """An expression outside the whitelist, or a result too large to compute."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt,
          "floor": math.floor, "ceil": math.ceil, "log": math.log, "exp": math.exp}
_CONSTS = {"pi": math.pi, "e": math.e}


def safe_eval(expression: str, *, max_abs: float = 1e100, max_exponent: int = 1000,
              max_length: int = 500) -> int | float:
    """Evaluate an arithmetic expression by walking its AST (never ``eval``).

    Allowed: int/float literals, ``+ - * / // % **``, unary ``+ -``, parentheses, the functions
    ``abs round min max sqrt floor ceil log exp`` and the constants ``pi e``. Exponents above
    ``max_exponent`` and intermediate values above ``max_abs`` are refused, so ``9**9**9`` is an
    error, not a hang.
    """
    if not isinstance(expression, str):
        raise MathError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > max_length:
        raise MathError(f"expression longer than {max_length} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise MathError(f"not an arithmetic expression: {e.msg}") from None

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise MathError(f"unsupported value {v!r}")
        if (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) or abs(v) > max_abs:
            raise MathError("result out of range")
        return v

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return check(node.value)
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > max_exponent or
                                                 (abs(left) > 1 and abs(right) *
                                                 math.log10(abs(left)) > math.log10(max_abs))):
                raise MathError("exponent too large")
            try:
                return check(_BINOPS[type(node.op)](left, right))
            except (ZeroDivisionError, OverflowError) as e:
                raise MathError(f"{type(e).__name__}: {e}") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return check(_UNARY[type(node.op)](ev(node.operand)))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS and not node.keywords and len(node.args) <= 8):
            try:
                return check(_FUNCS[node.func.id](*[ev(a) for a in node.args]))
            except (ValueError, TypeError, OverflowError) as e:
                raise MathError(f"{node.func.id}: {e}") from None
        raise MathError(f"not allowed in an arithmetic expression: {type(node).__name__}"
                        + (f" {node.id!r}" if isinstance(node, ast.Name) else ""))

    return ev(tree)


# ---------------------------------------------------------------------------------- SQLite

_SQLITE_DENY_ALWAYS = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA}
_SQLITE_READ_ONLY_OK = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                        sqlite3.SQLITE_RECURSIVE}


def _json_size(value: Any) -> int:
    """A cheap estimate of ``value``'s size in ``json.dumps`` (no copy of the value): ASCII
    text its length plus quotes (escapes aside), other text 6 bytes a character
    (``\\uXXXX``), a blob as hex."""
    if value is None:
        return 4
    if isinstance(value, str):
        return len(value) + 2 if value.isascii() else 6 * len(value) + 2
    if isinstance(value, bytes | bytearray | memoryview):
        return 2 * len(value) + 2
    return 24  # int, float


class SQLiteSandbox:
    """An in-memory SQLite database for one rollout.

    ``setup_sql`` (trusted) creates and fills it; then an authorizer is installed that forbids
    ``ATTACH``/``DETACH`` (no other database files), every ``PRAGMA``, extension loading and --
    with ``read_only=True`` -- anything but reading. A progress handler aborts a query after
    ``timeout_s``. Results are fetched in small chunks and stop at ``max_rows`` rows or at
    ``max_bytes`` (the rows' estimated size as JSON), so a huge result is never held whole; no
    single string or blob a query produces may exceed ``max_value_bytes`` (SQLite's length
    limit: ``string or blob too big``). The default ``max_bytes`` (about a thousand tokens)
    stays within the agent loop's default tool-result caps.
    """

    def __init__(self, setup_sql: str = "", *, read_only: bool = True, timeout_s: float = 2.0,
                 max_rows: int = 200, max_bytes: int = 4096, max_value_bytes: int = 1 << 20):
        if max_rows < 1 or max_bytes < 1 or max_value_bytes < 1:
            raise ValueError("max_rows, max_bytes and max_value_bytes must be >= 1")
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        if hasattr(self.conn, "enable_load_extension"):  # absent when built without it
            self.conn.enable_load_extension(False)
        if setup_sql:
            self.conn.executescript(setup_sql)
            self.conn.commit()
        self.read_only = read_only
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        self.conn.set_authorizer(self._authorize)
        self._deadline = 0.0
        self.conn.set_progress_handler(self._progress, 1000)

    def _authorize(self, action, arg1, arg2, db_name, trigger):
        if action in _SQLITE_DENY_ALWAYS:
            return sqlite3.SQLITE_DENY
        if self.read_only and action not in _SQLITE_READ_ONLY_OK:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def query(self, sql: str) -> dict[str, Any]:
        """Run one statement; returns ``{"columns", "rows", "truncated"}`` or raises
        ``sqlite3.Error`` with SQLite's message (``not authorized``, ``interrupted``, ``string
        or blob too big``, ...).

        ``rows`` are the first rows, up to ``max_rows`` and ``max_bytes`` (estimated JSON size,
        column names included); ``truncated`` says the result had more. Stopped by the byte
        budget, the result also holds ``"truncated_by": "bytes"`` and ``"max_bytes"`` (no rows
        at all when the first row alone exceeds it). Rows are fetched a few at a time, sized by
        the rows so far, and the rest are never fetched."""
        self._deadline = time.monotonic() + self.timeout_s
        cur = self.conn.execute(sql)
        try:
            cols = [d[0] for d in cur.description or []]
            rows: list[list[Any]] = []
            size = 2 + sum(_json_size(c) + 1 for c in cols)
            by: str | None = None
            chunk = 1  # the first row sizes the next fetch
            while by is None:
                batch = cur.fetchmany(chunk)
                if not batch:
                    break
                for row in batch:
                    if len(rows) == self.max_rows:
                        by = "rows"
                        break
                    n = 2 + sum(_json_size(v) + 1 for v in row)
                    if size + n > self.max_bytes:
                        by = "bytes"
                        break
                    rows.append(list(row))
                    size += n
                per_row = max(1, size // max(1, len(rows)))
                chunk = max(1, min(256, self.max_rows + 1 - len(rows),
                                   (self.max_bytes - size) // per_row + 1))
        finally:
            cur.close()
        out: dict[str, Any] = {"columns": cols, "rows": rows, "truncated": by is not None}
        if by == "bytes":
            out.update(truncated_by="bytes", max_bytes=self.max_bytes)
        return out

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------------- Python

# Model-written Python runs under OS-level isolation (bubblewrap): mtrl_jax/envs/code_sandbox.py.
from mtrl_jax.envs.code_sandbox import (  # noqa: E402 -- re-exported for existing callers
    PythonLimits,
    PythonResult,
    SandboxUnavailable,
    run_python,
)

__all__ = ["MathError", "PythonLimits", "PythonResult", "SQLiteSandbox", "SandboxUnavailable",
           "run_python", "safe_eval"]
