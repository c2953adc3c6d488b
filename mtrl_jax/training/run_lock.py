"""One run per output folder: an advisory lock file, ``<output_dir>/.mtrl.lock``.

The lock is a POSIX ``flock`` on the file (released by the kernel when the holding process
exits, however it exits), and the file names its holder (pid, host, start time) so that a
refused run can say who holds the folder. A lock file whose holder is gone is taken over with a
message. Within one process the lock is re-entrant: a notebook that builds a second trainer on
the same folder (after the first one crashed or was dropped) takes it over.

``flock`` on network file systems may not exclude processes on other hosts; the lock is meant
for one machine (or a file system that honours ``flock``, as NFSv4 and Lustre do).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

LOCK_NAME = ".mtrl.lock"

_HELD: dict[str, int] = {}  # real path of the lock file -> open fd, per process


class RunLockError(RuntimeError):
    """Another live run holds the output folder."""


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "an unknown process"
    return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (started "
            f"{h.get('started', '?')})")


def acquire(output_dir: str, *, say=None) -> str:
    """Lock ``output_dir`` for this process; returns the lock file's path.

    Raises :class:`RunLockError` naming the holder when another live process holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(output_dir, LOCK_NAME))
    if path in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockError(
            f"output_dir {output_dir} is in use by another run: {_describe(_holder(path))}. "
            "Wait for it to finish, stop it, or use another output_dir.") from None
    old = _holder(path)
    if old and say is not None:
        say(f"taking over the lock of {output_dir} left by {_describe(old)}, which is no "
            "longer running")
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "argv": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    _HELD[path] = fd
    return path


def release(output_dir: str) -> None:
    """Release this process's lock of ``output_dir`` (no-op when it holds none)."""
    path = os.path.realpath(os.path.join(output_dir, LOCK_NAME))
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # an empty file: nobody holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
