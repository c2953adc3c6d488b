"""Process-level settings that make XLA:CPU fast, applied by the entry points (CLI, benchmarks).

XLA:CPU gives most ops a fresh output buffer. With glibc's defaults every buffer above 32 MB is
a new ``mmap`` that the kernel faults in 4 KB at a time, so a large element-wise op spends most
of its time in page faults: on this project's 2-core machine an ``x * 2`` over 67 MB took 34 ms
with fresh output memory and 3.6 ms in place (``experiments/LOG.md``, 2026-11-25). glibc >= 2.35
can back ``malloc``'d memory with transparent huge pages (``glibc.malloc.hugetlb=1``): the same op
then takes 9 ms, and a LoRA train step on 8 x 1024 tokens runs markedly faster.

glibc reads tunables only at process start, hence :func:`reexec_with_fast_malloc`, which
re-executes the current command once with the tunable set. ``MTRL_NO_REEXEC=1`` turns it off.
"""

from __future__ import annotations

import os
import sys

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def fast_malloc_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process that should start with the fast ``malloc`` (same rules as
    :func:`reexec_with_fast_malloc`; a copy is returned)."""
    env = dict(env)
    current = env.get("GLIBC_TUNABLES", "")
    if (sys.platform == "linux" and env.get("MTRL_NO_REEXEC") != "1"
            and MALLOC_TUNABLE not in current and _thp_available()):
        env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    return env


def reexec_with_fast_malloc() -> None:
    """Re-exec the running command with ``GLIBC_TUNABLES`` += ``glibc.malloc.hugetlb=1``.

    No-op when already set, off Linux, without transparent huge pages, or with
    ``MTRL_NO_REEXEC=1``. Call it first thing in ``main()``: the process is replaced.
    """
    current = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or os.environ.get("MTRL_NO_REEXEC") == "1"
            or MALLOC_TUNABLE in current or not _thp_available()):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    env["MTRL_NO_REEXEC"] = "1"  # never loop, even if glibc ignores the tunable
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
