"""Verifiable execution: safe arithmetic, locked-down SQLite, sandboxed Python (escapes)."""

import dataclasses
import os
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrl_jax.envs.verifiable import (
    MathError,
    PythonLimits,
    SQLiteSandbox,
    run_python,
    safe_eval,
)

# ------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize("expr,value", [("2+3*4", 14), ("(2+3)*4", 20), ("-2**2", -4),
                                        ("7//2 + 7%2", 4), ("sqrt(16) + abs(-1)", 5.0),
                                        ("max(1, 2, 3) - min(4, 5)", -1), ("2**10", 1024),
                                        ("round(pi, 2)", 3.14)])
def test_safe_eval_values(expr, value):
    assert safe_eval(expr) == pytest.approx(value)


@pytest.mark.parametrize("expr,msg", [
    ("__import__('os').system('ls')", "not allowed"),
    ("open('/etc/passwd')", "not allowed"),
    ("(1).__class__", "not allowed"),
    ("9**9**9", "exponent too large"),
    ("10**400", "exponent too large"),
    ("1/0", "ZeroDivisionError"),
    ("x + 1", "not allowed"),
    ("[1, 2]", "not allowed"),
    ("lambda: 1", "not allowed"),
    ("2 +", "not an arithmetic expression"),
    ("True + 1", "unsupported value"),
])
def test_safe_eval_refuses(expr, msg):
    with pytest.raises(MathError, match=msg):
        safe_eval(expr)


@given(st.text(max_size=60))
def test_safe_eval_only_raises_math_error(text):
    try:
        safe_eval(text)
    except MathError:
        pass


# ------------------------------------------------------------------------------ SQLite

SETUP = "CREATE TABLE t(id INTEGER, name TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');"


def test_sqlite_reads_and_refuses_everything_else(tmp_path):
    db = SQLiteSandbox(SETUP, max_rows=1)
    assert db.query("SELECT name FROM t ORDER BY id") == {"columns": ["name"], "rows": [["a"]],
                                                          "truncated": True}
    target = tmp_path / "x.db"
    for sql in (f"ATTACH DATABASE '{target}' AS x", "PRAGMA table_info(t)",
                "INSERT INTO t VALUES (3, 'c')", "DROP TABLE t", "CREATE TABLE u(x)",
                f"VACUUM INTO '{target}'", "SELECT load_extension('x')"):
        with pytest.raises(sqlite3.Error):
            db.query(sql)
    assert not target.exists()
    assert db.query("SELECT count(*) FROM t")["rows"] == [[2]]
    db.close()


def test_sqlite_query_timeout():
    db = SQLiteSandbox(SETUP, timeout_s=0.2)
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) "
                 "SELECT count(*) FROM c")
    db.close()


def test_sqlite_writable_mode_still_forbids_files(tmp_path):
    db = SQLiteSandbox(SETUP, read_only=False)
    db.query("INSERT INTO t VALUES (3, 'c')")
    assert db.query("SELECT count(*) FROM t")["rows"] == [[3]]
    with pytest.raises(sqlite3.DatabaseError):
        db.query(f"ATTACH DATABASE '{tmp_path / 'y.db'}' AS y")
    db.close()


# ------------------------------------------------------------------------------ Python

LIMITS = PythonLimits(wall_s=3.0, cpu_s=2, memory_mb=256, file_mb=4)


def test_python_runs_ordinary_code():
    r = run_python("import json, math\nprint(json.dumps([math.factorial(5), 2**10]))",
                   limits=LIMITS)
    assert r.ok and r.stdout.strip() == "[120, 1024]" and r.stopped_by is None


@pytest.mark.parametrize("name,code,stopped_by", [
    ("read outside", "print(open('/etc/hostname').read())", "sandbox_violation"),
    ("read via parent", "print(open('../../../etc/hostname').read())", "sandbox_violation"),
    ("list root", "import os\nprint(os.listdir('/'))", "sandbox_violation"),
    ("write outside", "open('/tmp/mtrl_escape.txt', 'w').write('x')", "sandbox_violation"),
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 22))", "sandbox_violation"),
    ("raw _socket", "__import__('_socket')", "sandbox_violation"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "sandbox_violation"),
    ("subprocess", "import subprocess\nsubprocess.run(['ls'])", "sandbox_violation"),
    ("os.system", "import os\nos.system('ls /')", "sandbox_violation"),
    ("ctypes", "import ctypes", "sandbox_violation"),
    ("infinite loop", "while True:\n    pass", "cpu_limit"),
    ("sleeping forever", "import time\ntime.sleep(60)", "wall_timeout"),
    ("memory bomb", "x = bytearray(10**10)", "memory_limit"),
    ("growing memory", "a = []\nwhile True:\n    a.append(' ' * 10**7)", "memory_limit"),
    ("file bomb", "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)", "file_limit"),
])
def test_python_escapes_are_stopped_and_reported(name, code, stopped_by):
    limits = LIMITS
    if stopped_by == "cpu_limit":
        # On a loaded CI machine (2 cores, several xdist workers) the loop may get well under
        # one core; a wall budget far above the CPU budget keeps the CPU limit the one that fires.
        limits = dataclasses.replace(LIMITS, wall_s=60.0, cpu_s=1)
    r = run_python(code, limits=limits)
    assert not r.ok
    assert r.stopped_by == stopped_by, (name, r)
    assert r.report().startswith("Execution stopped")
    assert not os.path.exists("/tmp/mtrl_escape.txt")


def test_python_workdir_is_removed():
    before = {p for p in os.listdir("/tmp") if p.startswith("mtrl_py_")}
    run_python("open('scratch.txt', 'w').write('ok')", limits=LIMITS)
    after = {p for p in os.listdir("/tmp") if p.startswith("mtrl_py_")}
    assert after <= before
