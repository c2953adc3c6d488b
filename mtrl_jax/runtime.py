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


#: JAX's accelerator plugins (CUDA 12 / 13, ROCm) and the TPU runtime, by module name
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu")


def cpu_backend_expected(env: dict[str, str] | None = None) -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or no accelerator plugin is
    installed (looked up without importing it). The glibc tunable is an XLA:CPU remedy; on a
    GPU or TPU host the process is left as it started."""
    import importlib.util

    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    for name in ACCELERATOR_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


def fast_malloc_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process that should start with the fast ``malloc`` (same rules as
    :func:`reexec_with_fast_malloc`; a copy is returned)."""
    env = dict(env)
    current = env.get("GLIBC_TUNABLES", "")
    if (sys.platform == "linux" and env.get("MTRL_NO_REEXEC") != "1"
            and MALLOC_TUNABLE not in current and _thp_available()
            and cpu_backend_expected(env)):
        env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    return env


def reexec_with_fast_malloc() -> None:
    """Re-exec the running command with ``GLIBC_TUNABLES`` += ``glibc.malloc.hugetlb=1``.

    No-op when already set, off Linux, without transparent huge pages, with
    ``MTRL_NO_REEXEC=1``, or when JAX will run on an accelerator
    (:func:`cpu_backend_expected`). Call it first thing in ``main()``: the process is replaced.
    """
    current = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or os.environ.get("MTRL_NO_REEXEC") == "1"
            or MALLOC_TUNABLE in current or not _thp_available() or not cpu_backend_expected()):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    env["MTRL_NO_REEXEC"] = "1"  # never loop, even if glibc ignores the tunable
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
