"""Stateful sandboxes: per-episode resources created at setup and always torn down.

A :class:`SandboxEnvironment` gets a fresh :class:`Resources` registry in ``setup``; whatever
``create(task)`` makes through it (temporary folders, SQLite files, child processes, or any
object with a cleanup callback) is released in reverse order by ``teardown`` -- which the agent
loop runs in ``finally`` after an answer, ``max_turns``, an exception in a tool or in ``create``
itself, or cancellation of the episode.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mtrl_jax.envs.base import Environment, Task

T = TypeVar("T")


class Resources:
    """A stack of cleanups for one episode."""

    def __init__(self) -> None:
        self._cleanups: list[tuple[str, Callable[[], Any]]] = []
        self.closed = False

    def add(self, obj: T, cleanup: Callable[[], Any | Awaitable[Any]], name: str = "") -> T:
        """Register ``cleanup`` (sync or async) to run at teardown; returns ``obj``."""
        if self.closed:
            raise RuntimeError("episode resources are already released")
        self._cleanups.append((name or type(obj).__name__, cleanup))
        return obj

    def temp_dir(self, prefix: str = "mtrl_env_", base: str | None = None) -> str:
        path = tempfile.mkdtemp(prefix=prefix, dir=base)
        return self.add(path, lambda: shutil.rmtree(path, ignore_errors=True), "temp_dir")

    def sqlite(self, path: str = ":memory:") -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False)
        return self.add(conn, conn.close, "sqlite")

    async def process(self, *cmd: str, **kwargs) -> asyncio.subprocess.Process:
        """A child process in its own process group, killed (with its children) at teardown."""
        proc = await asyncio.create_subprocess_exec(*cmd, start_new_session=True, **kwargs)

        async def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            await proc.wait()

        return self.add(proc, kill, "process")

    async def close(self) -> None:
        """Run every cleanup (last registered first), even if one fails or the caller is
        cancelled meanwhile; then re-raise the cancellation or the first failure."""
        self.closed = True
        first: BaseException | None = None
        cancelled: BaseException | None = None
        while self._cleanups:
            name, fn = self._cleanups.pop()
            try:
                out = fn()
                if inspect.isawaitable(out):
                    await out
            except asyncio.CancelledError as e:  # finish releasing, then propagate
                cancelled = cancelled or e
            except Exception as e:
                first = first or RuntimeError(f"cleanup of {name} failed: {e!r}")
        if cancelled is not None:
            raise cancelled
        if first is not None:
            raise first


class SandboxEnvironment(Environment):
    """Override ``create(task)`` to build the episode's state through ``self.resources``."""

    async def create(self, task: Task) -> None:
        pass

    async def setup(self, task: Task) -> None:
        self.task = task
        self.resources = Resources()
        await self.create(task)

    async def teardown(self) -> None:
        resources = getattr(self, "resources", None)
        if resources is not None:
            await resources.close()
