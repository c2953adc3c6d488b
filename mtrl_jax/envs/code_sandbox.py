"""Model-written Python, run under OS-level isolation (bubblewrap), and an environment around it.

:func:`run_python` runs a program in a throw-away sandbox built by ``bwrap``:

- **Filesystem**: a new mount namespace holding only the interpreter binary, ``/usr/lib`` (its
  standard library and shared libraries) and the ``/lib*`` links, all read-only; the scratch
  folder (``workdir``) bound read-write at ``/sandbox`` (the working directory); a private
  size-capped tmpfs on ``/tmp``; a minimal ``/dev``. No ``/etc``, ``/root``, ``/home``, the
  repository, the virtual environment, the host's ``/tmp`` or ``/proc``.
- **Namespaces**: new user, PID, network (loopback only), IPC, UTS, mount and cgroup
  namespaces, nested user namespaces disabled; uid/gid 65534; no capabilities; a new session
  (no terminal injection); ``--die-with-parent``.
- **Identity on the host**: when the harness runs as root, ``bwrap`` itself is started as uid
  65534 (``setpriv``), so sandboxed processes are ``nobody`` on the host too -- RLIMIT_NPROC is
  ignored for uid 0, and a kernel-level escape would not land as root.
- **Limits**: a few lines of launcher code, the first thing the sandboxed interpreter runs, set
  soft *and* hard rlimits (CPU, address space, processes, file size, open files, core, locked
  memory, message queues) before reading the user's program. Raising a hard limit needs
  CAP_SYS_RESOURCE in the initial user namespace, which nothing in the sandbox has, so the
  program cannot undo them (``tests/test_sandbox_escape.py`` checks). No ``preexec_fn``: the
  harness never runs Python code between ``fork`` and ``exec`` (unsafe in a threaded process,
  and it forces ``fork`` over ``vfork``).
- **Seccomp** (x86-64 and aarch64): ``ptrace``, ``process_vm_*``, ``mount`` and the other
  namespace, keyring, BPF, perf, io_uring and module syscalls fail with EPERM (without it the
  program could ptrace bwrap's init, which has no rlimits); with ``max_processes=1`` so do
  ``fork``/``vfork``/``clone`` of a process, whatever the uid accounting.
- **Lifetime**: the program is PID 2 of its PID namespace; when it exits ``bwrap`` exits, its
  init gets SIGKILL (``--die-with-parent``) and the kernel kills everything left in the
  namespace -- a double-forked daemon included; ``run_python`` returns only after that init
  is gone (``--info-fd`` names it). If the harness dies, the same happens: the parent-death
  signal fires when the *thread* that started ``bwrap`` exits, and ``run_python`` starts and
  waits in the same thread, so calling it from a worker thread (``asyncio.to_thread``) is safe
  (never hand the process over to another thread). Output is read with a deadline and capped,
  so a process holding the pipe cannot block the harness.
- **Audit hook**: the old prelude (refusing sockets, process creation, native code and file
  access outside the scratch folder) still runs first, as defence in depth only.

When ``bwrap`` or user namespaces are missing, :func:`run_python` raises
:class:`SandboxUnavailable` naming what is missing, unless the caller opts in to running
unisolated (``allow_unisolated=True`` or ``MTRL_ALLOW_UNISOLATED_CODE=1``): then it warns once
and runs a plain ``python -I -S`` subprocess with the same launcher (rlimits, audit hook,
``setpriv --pdeathsig``, ``unshare -n`` where possible) -- host files and the network stay
reachable to model-written code there.

Not covered: the scratch folder's total size (only each file's size, via RLIMIT_FSIZE, and the
wall time bound it), CPU time of several processes when ``max_processes > 1`` (per process),
memory outside RLIMIT_AS (the /tmp tmpfs is capped by ``--size``), and kernel bugs reachable
through the syscalls that stay allowed. ``benchmarks/sandbox_overhead.py`` measures the cost
(~35-45 ms per trivial call here, of which ~16-22 ms is the interpreter's own start-up).

:class:`CodeExecutionEnvironment` is the training environment: one ``run_python`` tool, one
scratch folder per episode, each call isolated as above and run in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import marshal
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtrl_jax.envs.base import Episode, Task
from mtrl_jax.envs.sandbox import SandboxEnvironment
from mtrl_jax.envs.scoring import dense_reward
from mtrl_jax.envs.tools import Tool, tool

__all__ = ["CodeExecutionEnvironment", "PythonLimits", "PythonResult", "SandboxUnavailable",
           "run_python", "sandbox_available", "sandbox_problem"]

#: uid/gid of sandboxed code (inside the sandbox, and on the host when the harness is root)
SANDBOX_UID = 65534
#: where the scratch folder appears inside the sandbox
SCRATCH = "/sandbox"
#: the opt-in environment variable for running without isolation
ALLOW_UNISOLATED_ENV = "MTRL_ALLOW_UNISOLATED_CODE"

_OUTPUT_CAP = 1 << 20  # bytes kept per stream while reading (the tail)
_DRAIN_S = 0.25  # how long to keep reading pipes after the program is gone
_SYS_PATH = "/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """OS-level isolation cannot be set up here (and running unisolated was not allowed)."""


@dataclass(frozen=True)
class PythonLimits:
    """Resource limits of a sandboxed run.

    ``max_processes`` counts the program itself (and its threads: Linux counts tasks), so the
    default 1 means no child processes and no threads.
    """

    wall_s: float = 5.0
    cpu_s: int = 3
    memory_mb: int = 512
    file_mb: int = 8
    max_open_files: int = 64
    max_processes: int = 1


@dataclass(frozen=True)
class PythonResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    stopped_by: str | None  # "wall_timeout", "cpu_limit", "memory_limit", "file_limit",
    # "sandbox_violation", "signal N", or None for a normal exit
    isolated: bool = True  # False: ran unisolated (the explicit opt-in)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def report(self) -> str:
        """What the model reads back."""
        if self.ok:
            return self.stdout[-4000:] or "(no output)"
        why = self.stopped_by or f"exit code {self.returncode}"
        tail = (self.stderr or self.stdout)[-1500:]
        return f"Execution stopped ({why}).\n{tail}".strip()


# ---------------------------------------------------------------------------- launcher
# The sandboxed interpreter runs ``python -I -S -B -c STUB [CODE] <limits...> <hook>``. _BOOT
# sets the rlimits (soft = hard, so they cannot be raised back), installs the audit hook (_P),
# then compiles ``main.py`` and runs it as ``__main__``. If a limit cannot be set the launcher
# fails before the program runs (fail closed). Speed: -S (no ``site``), no ``runpy``, the hook
# written against ``posix`` (importing ``os`` costs ~4 ms), and both code objects compiled once
# in the harness and passed marshalled (compiling them costs ~10 ms per call) whenever the
# sandbox's interpreter has the harness's bytecode magic; otherwise they are passed as source.

_BOOT = r"""
def _boot(a):
    import resource as R
    cpu, mem, fsz, nof, npr = (int(x) for x in a[1:6])
    want = [(R.RLIMIT_CORE, 0, 0), (R.RLIMIT_CPU, cpu, cpu + 1), (R.RLIMIT_AS, mem, mem),
            (R.RLIMIT_FSIZE, fsz, fsz), (R.RLIMIT_NOFILE, nof, nof), (R.RLIMIT_MEMLOCK, 0, 0),
            (R.RLIMIT_MSGQUEUE, 0, 0)]
    if npr > 0:
        want.append((R.RLIMIT_NPROC, npr, npr))
    for res, soft, hard in want:
        cur = R.getrlimit(res)[1]
        hard = hard if cur == R.RLIM_INFINITY else min(hard, cur)
        R.setrlimit(res, (min(soft, hard), hard))
    with open("main.py", "rb") as f:  # compiling str, not bytes, saves ~2 ms (no codec
        src = f.read().decode("utf-8", "surrogateescape").removeprefix("\ufeff")  # lookup)
    if a[6] == "1":
        exec(_P, {"__name__": "_sandbox"})
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv[:] = ["main.py"]
    return compile(src, "main.py", "exec"), main.__dict__
_c, _g = _boot(sys.argv)
del _boot, _P
exec(_c, _g)
"""

# Defence in depth only (the OS isolation above is the boundary): refuses network, process
# creation, native code from outside the installation, signals, limits, and file access outside
# the working directory (reads of the Python installation stay allowed, so imports work).
_PRELUDE = r'''
import sys as _sys, posix as _posix, _signal
def _fsdecode(p):
    return p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p
def _realpath(path):
    """os.path.realpath (absolute, links resolved, missing parts kept) without importing os."""
    if not path.startswith("/"):
        path = _posix.getcwd() + "/" + path
    todo, done, links = [p for p in path.split("/") if p not in ("", ".")], [], 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            done = done[:-1]
            continue
        here = "/" + "/".join(done + [name])
        try:
            is_link = _posix.lstat(here).st_mode & 0o170000 == 0o120000
        except (OSError, ValueError):
            is_link = False
        if not is_link:
            done.append(name)
            continue
        links += 1
        if links > 40:
            raise PermissionError("sandbox: too many levels of symbolic links")
        target = _posix.readlink(here)
        if target.startswith("/"):
            done = []
        todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return "/" + "/".join(done)
_ROOT = _realpath(_posix.getcwd())
_PY = tuple({_realpath(p) for p in (_sys.prefix, _sys.base_prefix, _sys.exec_prefix)})
_DENY_EVENTS = ("socket.", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
                "os.system", "subprocess.", "os.kill", "os.killpg", "ctypes.", "os.putenv",
                "os.unsetenv", "pty.", "resource.setrlimit", "resource.prlimit",
                "sys.remote_exec", "mmap.", "gc.get_", "sqlite3.enable_load_extension",
                "sqlite3.load_extension", "os.setxattr", "os.removexattr", "os.chflags",
                "fcntl.ioctl")
_DENY_MODULES = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "socket", "_socket",
                 "multiprocessing", "_multiprocessing", "subprocess", "_posixsubprocess",
                 "_posixshmem", "_testcapi", "_testinternalcapi", "_xxsubinterpreters"}
# event: (indices of path arguments, indices of dir_fd arguments, reads only?)
_PATH_ARGS = {"os.remove": ((0,), (1,), 0), "os.rmdir": ((0,), (1,), 0),
              "os.mkdir": ((0,), (2,), 0), "os.chmod": ((0,), (2,), 0),
              "os.chown": ((0,), (3,), 0), "os.rename": ((0, 1), (2, 3), 0),
              "os.link": ((0, 1), (2, 3), 0), "os.symlink": ((0, 1), (2,), 0),
              "os.truncate": ((0,), (), 0), "os.utime": ((0,), (3,), 0),
              "shutil.chown": ((0,), (), 0), "os.chdir": ((0,), (), 1),
              "os.listdir": ((0,), (), 1), "os.scandir": ((0,), (), 1),
              "os.walk": ((0,), (), 1), "os.fwalk": ((0,), (4,), 1),
              "glob.glob": ((0,), (), 1), "glob.glob/2": ((0, 2), (3,), 1)}
_WRITE = _posix.O_WRONLY | _posix.O_RDWR | _posix.O_CREAT | _posix.O_TRUNC | _posix.O_APPEND
# no audit event for these; ``os`` copies ``posix`` when first imported, so they are gone from
# both (a reload of the module could bring them back: hence "depth", not "boundary")
_GONE = ("pidfd_open", "setpgid", "setsid", "setuid", "setgid", "setreuid", "setresuid")
for _m in (_posix, _sys.modules.get("os")):
    for _n in _GONE if _m is not None else ():
        _m.__dict__.pop(_n, None)
_signal.__dict__.pop("pidfd_send_signal", None)
_signal.__dict__.pop("pthread_kill", None)
def _deny(what):
    raise PermissionError(f"sandbox: {what} is not allowed")
def _inside(path, roots):
    p = _realpath(path)
    return any(p == r or p.startswith(r + "/") for r in roots)
def _as_path(a):
    if isinstance(a, (str, bytes)):
        return _fsdecode(a)
    if type(a).__module__ == "pathlib":  # trusted __fspath__; a user subclass is refused
        return _fsdecode(_posix.fspath(a))
    return None
def _check(event, a, roots):
    path = _as_path(a)
    if path is None or not _inside(path, roots):
        _deny(f"{event} on {a!r}")
def _authorizer(action, *args):
    return 1 if action in (24, 25) else 0  # SQLITE_ATTACH, SQLITE_DETACH -> SQLITE_DENY
def _hook(event, args):
    if event.startswith(_DENY_EVENTS):
        _deny(event)
    if event == "import" and args:
        name = str(args[0])
        if set(name.split(".")) & _DENY_MODULES:
            _deny(f"import of {name}")
        if len(args) > 1 and args[1] is not None:  # native code: only the installation's own
            where = _as_path(args[1])
            stem = (where or "").rsplit("/", 1)[-1].split(".")[0]
            if where is None or stem in _DENY_MODULES or not _inside(where, _PY):
                _deny(f"loading native code from {args[1]!r}")
    elif event == "open" and args and not isinstance(args[0], int):
        path = _as_path(args[0])
        if path is None:
            _deny(f"open of a {type(args[0]).__name__}")
        mode, flags = (list(args[1:3]) + [None, None])[:2]
        writing = bool(flags & _WRITE) if isinstance(flags, int) else \
            any(c in (mode or "r") for c in "wax+")
        if mode is None and not path.startswith("/") and (writing or ".." in path):
            _deny(f"os.open of relative path {path!r}")  # a dir_fd is invisible to the hook
        if not _inside(path, (_ROOT,)) and (writing or not _inside(path, _PY)):
            _deny(f"access to {path!r}")
    elif event in _PATH_ARGS:
        paths, dir_fds, reads = _PATH_ARGS[event]
        roots = (_ROOT,) + (_PY if reads else ())
        for i in dir_fds:
            if i < len(args) and args[i] is not None:
                _deny(f"{event} with dir_fd")  # the path it is relative to is unknowable
        for i in paths:
            a = args[i] if i < len(args) else None
            if a is None or (i == 0 and isinstance(a, int) and not isinstance(a, bool)):
                continue  # the working directory, or an already open descriptor
            _check(event, a, roots)
    elif event == "sqlite3.connect" and args:
        db = _as_path(args[0])
        if db not in (":memory:", ""):
            if db is None or db.startswith("file:"):
                _deny(f"sqlite3.connect({args[0]!r})")
            _check(event, db, (_ROOT,))
    elif event == "sqlite3.connect/handle" and args:
        args[0].set_authorizer(_authorizer)
_sys.addaudithook(_hook)
'''

#: the -c program when the sandbox's interpreter cannot take our bytecode: both as source
_SOURCE_STUB = "import sys\n_P = " + repr(_PRELUDE) + "\n" + _BOOT
#: the -c program otherwise: argv[1] is marshal.dumps((boot code, prelude code)), in hex
_MARSHAL_STUB = ("import sys, marshal\n_b, _P = marshal.loads(bytes.fromhex(sys.argv.pop(1)))\n"
                 "exec(_b)\n")
_precompiled: str | None = None


def _precompiled_hex() -> str:
    global _precompiled
    if _precompiled is None:
        _precompiled = marshal.dumps((compile(_BOOT, "<sandbox>", "exec"),
                                      compile(_PRELUDE, "<sandbox>", "exec"))).hex()
    return _precompiled


def _bytecode_magic() -> str:
    return importlib.util.MAGIC_NUMBER.hex()


#: what the probe runs in the sandbox: checks it works and learns the bytecode magic
_PROBE = "import _frozen_importlib_external as f\nprint('ok', f.MAGIC_NUMBER.hex())"

# ------------------------------------------------------------------------------ seccomp
# A classic-BPF filter handed to bwrap (--seccomp FD). Syscall numbers per architecture.

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENY_SYSCALLS = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "unshare": (272, 97), "setns": (308, 268), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "acct": (163, 89),
    "quotactl": (179, 60), "quotactl_fd": (443, 443), "syslog": (103, 116),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "move_mount": (429, 429), "open_tree": (428, 428), "mount_setattr": (442, 442),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272), "lookup_dcookie": (212, 18),
    "vhangup": (153, 58), "clock_settime": (227, 112), "settimeofday": (164, 170),
    "adjtimex": (159, 171), "clock_adjtime": (305, 266),
}
_DENY_X86_ONLY = {"iopl": 172, "ioperm": 173, "modify_ldt": 154, "uselib": 134}
_FORK = {"x86_64": (57, 58), "aarch64": ()}  # fork, vfork
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_CLONE_THREAD = 0x00010000


def _seccomp_filter(no_fork: bool) -> bytes | None:
    """The BPF program, or None on an architecture without a syscall table here."""
    arch = platform.machine()
    if arch not in _AUDIT_ARCH:
        return None
    col = 0 if arch == "x86_64" else 1
    deny = sorted({v[col] for v in _DENY_SYSCALLS.values()}
                  | (set(_DENY_X86_ONLY.values()) if col == 0 else set())
                  | (set(_FORK[arch]) if no_fork else set()))
    # labels resolved after layout: ("jeq", k, target) jumps to a named return
    prog: list[tuple] = [("ld", 4), ("jeq_skip", _AUDIT_ARCH[arch]), ("ret", "ENOSYS"),
                         ("ld", 0)]
    if col == 0:
        prog.append(("jge", 0x40000000, "EPERM"))  # the x32 ABI
    prog += [("jeq", nr, "EPERM") for nr in deny]
    if no_fork:
        prog += [("jeq", _CLONE3, "ENOSYS"), ("jeq", _CLONE[arch], "CLONE")]
    prog.append(("ret", "ALLOW"))
    labels = {}
    tail = [("CLONE", ("ld", 16)), (None, ("jset_allow", _CLONE_THREAD)),
            ("EPERM", ("ret", "EPERM")), ("ENOSYS", ("ret", "ENOSYS")),
            ("ALLOW", ("ret", "ALLOW"))]
    for name, ins in tail:
        if name:
            labels[name] = len(prog)
        prog.append(ins)
    rets = {"ALLOW": 0x7FFF0000, "EPERM": 0x00050000 | 1, "ENOSYS": 0x00050000 | 38}
    out = bytearray()
    for pc, ins in enumerate(prog):
        op = ins[0]
        if op == "ld":
            out += struct.pack("=HBBI", 0x20, 0, 0, ins[1])
        elif op == "ret":
            out += struct.pack("=HBBI", 0x06, 0, 0, rets[ins[1]])
        elif op == "jeq_skip":
            out += struct.pack("=HBBI", 0x15, 1, 0, ins[1])
        elif op in ("jeq", "jge"):
            out += struct.pack("=HBBI", 0x15 if op == "jeq" else 0x35,
                               labels[ins[2]] - pc - 1, 0, ins[1])
        elif op == "jset_allow":  # thread -> allow; else fall through to EPERM
            out += struct.pack("=HBBI", 0x45, labels["ALLOW"] - pc - 1, 0, ins[1])
    return bytes(out)


# ------------------------------------------------------------------------- the sandbox


@dataclass(frozen=True)
class _Plan:
    """How to start a sandbox on this machine (found once by the probe)."""

    bwrap: str
    python: str  # the interpreter, at the same path inside the sandbox
    binds: tuple[str, ...]  # bwrap arguments for the read-only system view
    drop: tuple[str, ...]  # the setpriv prefix that starts bwrap as SANDBOX_UID ('' if not root)
    drop_kwargs: tuple[tuple[str, Any], ...]  # Popen(user=...) when there is no setpriv
    userns_flags: tuple[str, ...]
    seccomp: bool
    precompiled: bool = False  # the interpreter takes the harness's bytecode (marshal)


def _interpreter() -> str | None:
    """The interpreter sandboxed code runs on: ``MTRL_SANDBOX_PYTHON`` if set, else the harness's
    base interpreter when it lives under /usr, else the system's ``python3.X`` of the same
    minor version (so nothing of /root -- pyenv -- or the venv has to be mounted)."""
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    candidates = [os.environ.get("MTRL_SANDBOX_PYTHON", ""),
                  base if base.startswith("/usr/") else "",
                  f"/usr/bin/{minor}", f"/usr/local/bin/{minor}", "/usr/bin/python3"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c)
    return None


def _system_binds(python: str) -> tuple[str, ...]:
    prefix = os.path.dirname(os.path.dirname(python))
    dirs = ["/usr/lib", "/usr/lib64", "/usr/lib32", f"{prefix}/lib"]
    args: list[str] = []
    for d in dict.fromkeys(os.path.realpath(x) for x in dirs):
        if os.path.isdir(d):
            args += ["--ro-bind", d, d]
    args += ["--ro-bind", python, python]
    for top in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return tuple(args)


def _bwrap_args(plan: _Plan, limits: PythonLimits, wd_fd: int, seccomp_fd: int | None,
                info_fd: int) -> list[str]:
    tmp_bytes = max(limits.file_mb, 1) * 4 << 20
    args = [*plan.drop, plan.bwrap, "--unshare-all", *plan.userns_flags,
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            "--cap-drop", "ALL", "--new-session", "--die-with-parent", "--clearenv",
            "--setenv", "PATH", _SYS_PATH, "--setenv", "HOME", SCRATCH,
            "--setenv", "TMPDIR", SCRATCH, "--setenv", "LC_ALL", "C.UTF-8",
            *plan.binds, "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp",
            "--bind-fd", str(wd_fd), SCRATCH, "--chdir", SCRATCH, "--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


def _launcher_args(python: str, limits: PythonLimits, nproc: int, audit_hook: bool,
                   precompiled: bool) -> list[str]:
    mb = 1 << 20
    program = [_MARSHAL_STUB, _precompiled_hex()] if precompiled else [_SOURCE_STUB]
    return [python, "-I", "-S", "-B", "-c", *program, str(int(limits.cpu_s)),
            str(int(limits.memory_mb) * mb), str(int(limits.file_mb) * mb),
            str(int(limits.max_open_files)), str(nproc), "1" if audit_hook else "0"]


_probe_lock = threading.Lock()
_probe_result: tuple[_Plan | None, str | None] | None = None


def _probe() -> tuple[_Plan | None, str | None]:
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _find_plan()
        return _probe_result


def _find_plan() -> tuple[_Plan | None, str | None]:
    if not sys.platform.startswith("linux"):
        return None, f"OS-level isolation needs Linux (this is {sys.platform})"
    bwrap = shutil.which("bwrap", path=os.environ.get("PATH", "") + os.pathsep + _SYS_PATH)
    if not bwrap:
        return None, ("bubblewrap is not installed (no `bwrap` on PATH; Debian/Ubuntu: "
                      "apt-get install bubblewrap)")
    python = _interpreter()
    if python is None:
        return None, "no system Python interpreter found to run inside the sandbox"
    drops: list[tuple[tuple[str, ...], tuple]] = [((), ())]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv", path=_SYS_PATH)
        drops = [((setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
                   "--clear-groups"), ()) if setpriv else
                 ((), (("user", SANDBOX_UID), ("group", SANDBOX_UID), ("extra_groups", [])))]
    binds = _system_binds(python)
    errors = []
    for drop, kwargs in drops:
        for userns in (("--unshare-user", "--disable-userns"), ("--unshare-user",)):
            for seccomp in (True, False):
                plan = _Plan(bwrap, python, binds, drop, kwargs, userns, seccomp)
                if seccomp and _seccomp_filter(True) is None:
                    continue
                try:
                    r = _execute(plan, _PROBE, PythonLimits(wall_s=20.0, cpu_s=10),
                                 None, "", audit_hook=True)
                except OSError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                words = r.stdout.split()
                if r.ok and words[:1] == ["ok"]:
                    if errors or not seccomp:  # a weaker configuration than the first
                        what = [] if seccomp else ["NO seccomp filter"]
                        what += [] if len(userns) > 1 else ["nested user namespaces ALLOWED"]
                        why = "; ".join(errors) or "no syscall table for this architecture"
                        warnings.warn(f"code sandbox: running with {', '.join(what)} (stronger "
                                      f"settings failed: {why})", RuntimeWarning, stacklevel=2)
                    return dataclasses.replace(
                        plan, precompiled=words[1:] == [_bytecode_magic()]), None
                errors.append((r.stderr or r.stdout).strip()[-300:] or
                              f"exit code {r.returncode}")
    detail = errors[0] if errors else "unknown error"
    if any(w in detail for w in ("namespace", "uid map", "unshare")):
        return None, ("user namespaces are disabled or not permitted here (check "
                      "user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor's "
                      f"restrict_unprivileged_userns, or the container's seccomp): bwrap said: "
                      f"{detail}")
    return None, f"bubblewrap could not start a sandbox: {detail}"


def sandbox_available() -> bool:
    """Whether OS-level isolation works here (probed once: a trivial sandboxed run)."""
    return _probe()[0] is not None


def sandbox_problem() -> str | None:
    """Why :func:`sandbox_available` is False (``None`` when it is True)."""
    return _probe()[1]


_warned = False


def _resolve(allow_unisolated: bool | None) -> _Plan | None:
    """The plan to use, ``None`` for the unisolated fallback, or raise SandboxUnavailable."""
    global _warned
    plan, problem = _probe()
    if plan is not None:
        return plan
    if allow_unisolated is None:
        allow_unisolated = os.environ.get(ALLOW_UNISOLATED_ENV, "") not in ("", "0")
    if not allow_unisolated:
        raise SandboxUnavailable(
            f"cannot isolate model-written code: {problem}. Install bubblewrap / enable user "
            f"namespaces, or accept the risk with allow_unisolated=True or "
            f"{ALLOW_UNISOLATED_ENV}=1")
    if not _warned:
        _warned = True
        warnings.warn(f"running model-written Python WITHOUT OS-level isolation ({problem}): "
                      "host files and the network are reachable by that code; only rlimits "
                      "and an audit hook (not a security boundary) stand in the way",
                      RuntimeWarning, stacklevel=3)
    return None


def run_python(code: str, *, limits: PythonLimits = PythonLimits(),
               workdir: str | None = None, stdin: str = "",
               allow_unisolated: bool | None = None, audit_hook: bool = True) -> PythonResult:
    """Run ``code`` as ``main.py`` in an isolated sandbox (see the module docstring).

    ``workdir`` is the scratch folder (``/sandbox`` inside, the working directory; a fresh
    temporary folder, removed afterwards, by default; when the harness is root it is handed to
    uid 65534). Calls sharing a ``workdir`` must not overlap. ``audit_hook=False`` drops the
    defence-in-depth hook (to test the OS isolation alone, or to let code start subprocesses
    within ``limits.max_processes``). Raises :class:`SandboxUnavailable` when isolation is
    impossible, unless ``allow_unisolated`` (or ``MTRL_ALLOW_UNISOLATED_CODE=1``).
    """
    plan = _resolve(allow_unisolated)
    return _execute(plan, code, limits, workdir, stdin, audit_hook=audit_hook)


def _execute(plan: _Plan | None, code: str, limits: PythonLimits, workdir: str | None,
             stdin: str, *, audit_hook: bool,
             on_start: Callable[[subprocess.Popen], Callable[[], None]] | None = None
             ) -> PythonResult:
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="mtrl_py_", dir=_scratch_base(plan))
    if plan is not None and _drops(plan) and not _reachable(workdir):
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise ValueError(f"workdir {workdir!r} is not reachable by uid {SANDBOX_UID} (a folder "
                         "on its path lacks o+x, e.g. pytest's tmp_path): bubblewrap, started "
                         "as that uid, cannot bind it; use a folder under /tmp")
    wd_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    own_fds, pass_fds = [wd_fd], [wd_fd]
    try:
        _write_script(wd_fd, textwrap.dedent(code), chown=plan is not None and _drops(plan))
        kwargs: dict[str, Any] = {}
        info_fd = info_w = None
        if plan is not None:
            seccomp_fd = None
            if plan.seccomp:
                prog = _seccomp_filter(no_fork=limits.max_processes <= 1)
                assert prog is not None
                seccomp_fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
                own_fds.append(seccomp_fd)
                pass_fds.append(seccomp_fd)
                os.write(seccomp_fd, prog)
                os.lseek(seccomp_fd, 0, os.SEEK_SET)
            info_fd, info_w = os.pipe2(os.O_CLOEXEC)
            own_fds += [info_fd, info_w]
            pass_fds.append(info_w)
            # +1: bwrap's init (PID 1 of the namespace) runs as the same uid
            cmd = _bwrap_args(plan, limits, wd_fd, seccomp_fd, info_w) + _launcher_args(
                plan.python, limits, max(limits.max_processes, 1) + 1, audit_hook,
                plan.precompiled)
            kwargs.update(plan.drop_kwargs)
            env = {"PATH": _SYS_PATH, "LC_ALL": "C.UTF-8"}
            cwd = "/"
        else:
            cmd = _unisolated_command(limits, audit_hook)
            env = {"PATH": _SYS_PATH, "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            cwd = workdir

        def spawned() -> None:  # the parent's copy of the write end: bwrap has its own
            if info_w is not None:
                own_fds.remove(info_w)
                os.close(info_w)

        return _spawn_and_wait(cmd, env, cwd, pass_fds, kwargs, stdin.encode(), limits,
                               info_fd=info_fd, spawned=spawned, on_start=on_start)
    finally:
        for fd in own_fds:
            os.close(fd)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _drops(plan: _Plan) -> bool:
    """bwrap is started as SANDBOX_UID (the harness is root)."""
    return bool(plan.drop or plan.drop_kwargs)


def _reachable(path: str) -> bool:
    """Whether SANDBOX_UID may walk down every folder above ``path``."""
    parts = os.path.realpath(path).split("/")
    for i in range(1, len(parts)):
        st = os.stat("/".join(parts[:i]) or "/")
        if not (st.st_mode & 0o001 or st.st_uid == SANDBOX_UID):
            return False
    return True


def _scratch_base(plan: _Plan | None) -> str | None:
    """Where scratch folders go: tempfile's default, unless bwrap runs as SANDBOX_UID and
    cannot reach it (TMPDIR under a 0700 folder); then /tmp or /var/tmp."""
    if plan is None or not _drops(plan):
        return None
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        if os.path.isdir(base) and _reachable(os.path.join(base, "x")):
            return base
    return None


def _write_script(wd_fd: int, code: str, *, chown: bool) -> None:
    """``main.py`` in the scratch folder, never following a link the sandbox may have left."""
    if chown:
        os.chown(wd_fd, SANDBOX_UID, SANDBOX_UID)
        os.chmod(wd_fd, 0o700)
    try:
        os.unlink("main.py", dir_fd=wd_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(f"/proc/self/fd/{wd_fd}/main.py", ignore_errors=True)
    fd = os.open("main.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=wd_fd)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(code)


_unshare_n: bool | None = None


def _unisolated_command(limits: PythonLimits, audit_hook: bool) -> list[str]:
    """The old approach (no preexec_fn): the launcher applies the rlimits; RLIMIT_NPROC only
    for non-root (root ignores it; the audit hook covers process creation)."""
    global _unshare_n
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    nproc = limits.max_processes if os.geteuid() != 0 else 0
    cmd = _launcher_args(python, limits, nproc, audit_hook, precompiled=True)  # the same python
    if _unshare_n is None:
        unshare = shutil.which("unshare", path=_SYS_PATH)
        try:
            _unshare_n = bool(unshare) and subprocess.run(
                [unshare, "-n", "true"], capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _unshare_n = False
    if _unshare_n:
        cmd = ["unshare", "-n", *cmd]
    setpriv = shutil.which("setpriv", path=_SYS_PATH)
    if setpriv:  # dies with the harness (pdeathsig, set at exec rather than in preexec_fn)
        cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
    return cmd


def _spawn_and_wait(cmd: list[str], env: dict[str, str], cwd: str, fds: list[int],
                    kwargs: dict[str, Any], data: bytes, limits: PythonLimits, *,
                    info_fd: int | None, spawned: Callable[[], None],
                    on_start: Callable[[subprocess.Popen], Callable[[], None]] | None
                    ) -> PythonResult:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds,
                            start_new_session=True, **kwargs)
    spawned()
    done = on_start(proc) if on_start else None
    try:
        out, err, timed_out = _communicate(proc, data, limits.wall_s, info_fd)
    finally:
        _kill_group(proc)
        if done:
            done()  # before reaping: nobody may signal the group once its id can be reused
        _reap(proc)
    stdout = out.decode("utf-8", "replace")[-20000:]
    stderr = err.decode("utf-8", "replace")[-20000:]
    rc = proc.returncode
    isolated = info_fd is not None
    if isolated and rc is not None and 128 < rc < 128 + 65:
        rc = -(rc - 128)  # bwrap reports a child killed by signal N as 128 + N
    return PythonResult(stdout, stderr, rc, timed_out, _why(rc, timed_out, stderr, isolated),
                        isolated)


def _communicate(proc: subprocess.Popen, data: bytes, wall_s: float, info_fd: int | None
                 ) -> tuple[bytes, bytes, bool]:
    """Feed stdin and read stdout/stderr until the program exits or the wall limit passes;
    kill the process group; read what is left for at most ``_DRAIN_S`` (a process still
    holding a pipe cannot make this wait); keep the last ``_OUTPUT_CAP`` bytes of each stream.

    ``info_fd`` (bwrap's --info-fd) names the sandbox's init on the host: after ``bwrap`` is
    gone this waits (bounded) for that init to be gone too -- by then the kernel has killed
    every process of the PID namespace, so nothing of the call survives its return.
    """
    deadline = time.monotonic() + wall_s
    assert proc.stdin and proc.stdout and proc.stderr
    out_fd, err_fd, stdin_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    info = bytearray()
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    if info_fd is not None:
        os.set_blocking(info_fd, False)
        sel.register(info_fd, selectors.EVENT_READ)
    if data:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    try:
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = -1
    state = {"view": memoryview(data), "exited": False, "init": -1}
    open_pipes = set(bufs)

    def read_info() -> None:
        try:
            chunk = os.read(info_fd, 4096)
        except BlockingIOError:
            return
        if chunk and len(info) < 65536:
            info.extend(chunk)
        try:
            doc, _ = json.JSONDecoder().raw_decode(info.decode())
            pid = int(doc["child-pid"])
        except (ValueError, KeyError, TypeError):
            if not chunk:
                sel.unregister(info_fd)
            return
        sel.unregister(info_fd)
        try:
            state["init"] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            fd = key.fd
            if fd == pidfd:
                state["exited"] = True
                sel.unregister(fd)
            elif fd == info_fd:
                read_info()
            elif fd == stdin_fd:
                view = state["view"]
                try:
                    view = view[os.write(fd, view[:65536]):]
                except OSError:  # BrokenPipeError: the program stopped reading
                    view = view[:0]
                state["view"] = view
                if not view:
                    sel.unregister(fd)
                    proc.stdin.close()
            else:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_pipes.discard(fd)
                    continue
                buf = bufs[fd]
                buf += chunk
                if len(buf) > 2 * _OUTPUT_CAP:
                    del buf[:-_OUTPUT_CAP]
        if pidfd < 0 and not state["exited"]:
            state["exited"] = _has_exited(proc)

    timed_out = False
    try:
        while not state["exited"]:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = not _has_exited(proc)
                break
            pump(min(left, 0.02) if pidfd < 0 else left)
        _kill_group(proc)  # bwrap on a timeout; the leftovers of the unisolated fallback
        drain_until = time.monotonic() + _DRAIN_S
        while open_pipes and time.monotonic() < drain_until:
            pump(max(drain_until - time.monotonic(), 0.0))
        if state["init"] >= 0:  # the namespace's init is killed when bwrap is gone
            _wait_readable(state["init"], 2.0)
    finally:
        sel.close()
        for fd in (pidfd, state["init"]):
            if fd >= 0:
                os.close(fd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    return bytes(bufs[out_fd][-_OUTPUT_CAP:]), bytes(bufs[err_fd][-_OUTPUT_CAP:]), timed_out


def _wait_readable(fd: int, timeout: float) -> None:
    with selectors.DefaultSelector() as s:
        s.register(fd, selectors.EVENT_READ)
        s.select(timeout)


def _has_exited(proc: subprocess.Popen) -> bool:
    """Exited (a zombie not yet reaped counts), without reaping: the process group id stays
    reserved until ``_kill_group`` has run."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.returncode is not None:
        return  # reaped: the id may belong to someone else now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # cannot happen after SIGKILL unless the kernel is stuck
        pass


def _why(returncode: int | None, timed_out: bool, stderr: str, isolated: bool) -> str | None:
    if timed_out:
        return "wall_timeout"
    if returncode is None or returncode == 0:
        return None
    if returncode < 0:
        sig = -returncode
        return {signal.SIGXCPU: "cpu_limit", signal.SIGKILL: "cpu_limit_or_killed",
                signal.SIGXFSZ: "file_limit"}.get(sig, f"signal {sig}")
    if isolated and returncode == 1 and stderr.startswith("bwrap: "):
        return "sandbox_error"
    if "PermissionError: sandbox:" in stderr:
        return "sandbox_violation"
    if "MemoryError" in stderr:
        return "memory_limit"
    if "File too large" in stderr or "EFBIG" in stderr:
        return "file_limit"
    return None


# --------------------------------------------------------------------------- environment


class CodeExecutionEnvironment(SandboxEnvironment):
    """One ``run_python(code)`` tool; a scratch folder per episode (files persist between the
    episode's calls); every call an isolated :func:`run_python` in a worker thread; calls of
    one episode run one at a time. Teardown kills a call still running, then removes the
    folder. The reward, when the task has ``expected`` fields, is
    :func:`~mtrl_jax.envs.scoring.dense_reward` of the final answer; otherwise 0.

    Construction does not probe; ``setup`` raises :class:`SandboxUnavailable` when isolation is
    missing and ``allow_unisolated`` was not given.
    """

    def __init__(self, limits: PythonLimits = PythonLimits(), *,
                 allow_unisolated: bool | None = None, audit_hook: bool = True):
        self.limits = limits
        self.allow_unisolated = allow_unisolated
        self.audit_hook = audit_hook
        self.tool_timeout_s = limits.wall_s + 5.0

    async def create(self, task: Task) -> None:
        self._plan = await asyncio.to_thread(_resolve, self.allow_unisolated)
        self.scratch = self.resources.temp_dir(prefix="mtrl_code_",
                                               base=_scratch_base(self._plan))
        self._live: set[subprocess.Popen] = set()
        self._lock = asyncio.Lock()
        self._calls: set[asyncio.Future] = set()
        self.resources.add(self, self._stop_calls, "code_calls")

    async def _stop_calls(self) -> None:
        for proc in list(self._live):
            _kill_group(proc)
        if self._calls:
            await asyncio.wait(self._calls, timeout=self.limits.wall_s + 5.0)

    def _started(self, proc: subprocess.Popen) -> Callable[[], None]:
        self._live.add(proc)
        if self.resources.closed:  # torn down while this call was starting
            _kill_group(proc)
        return lambda: self._live.discard(proc)

    async def run(self, code: str) -> PythonResult:
        """One isolated call in this episode's scratch folder."""
        async with self._lock:
            if self.resources.closed:
                raise RuntimeError("the episode is over")
            fut = asyncio.ensure_future(asyncio.to_thread(
                _execute, self._plan, code, self.limits, self.scratch, "",
                audit_hook=self.audit_hook, on_start=self._started))
            self._calls.add(fut)
            fut.add_done_callback(self._calls.discard)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:  # the tool timed out or the episode was cancelled
                for proc in list(self._live):
                    _kill_group(proc)
                raise

    def tools(self) -> list[Tool]:
        env = self

        @tool
        async def run_python(code: str) -> str:
            """Run a Python 3 program in an isolated sandbox and return what it prints.

            Files written to the current directory stay there for later calls in this episode;
            there is no network and only the standard library.

            Args:
              code: the program; print the results you want to see.
            """
            return (await env.run(code)).report()

        return [run_python]

    def reward(self, episode: Episode) -> None:
        if episode.task.expected:
            episode.update_reward(*dense_reward(episode.final_text, episode.task.expected))
        else:
            episode.update_reward(0.0)
