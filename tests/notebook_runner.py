"""Execute a percent-format notebook as Jupyter would: parsed by jupytext, code cells run top to
bottom in one namespace, with the notebook's parameters passed through the environment."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jupytext

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def run_notebook(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``notebooks/<name>``; returns the namespace the cells left (their variables).

    A failing cell raises with the cell's number; ``env`` is set for the run and restored."""
    path = NOTEBOOKS / name
    nb = jupytext.read(path, fmt="py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells), f"{name}: not a notebook"
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    ns: dict[str, Any] = {"__name__": "__main__", "__file__": str(path)}
    try:
        for i, cell in enumerate(code):
            try:
                exec(compile(cell.source, f"{name}[cell {i}]", "exec"), ns)
            except Exception as exc:
                raise AssertionError(f"{name}: code cell {i} failed: {exc!r}\n{cell.source}") \
                    from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ns
