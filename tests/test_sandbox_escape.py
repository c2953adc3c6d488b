"""Escape attempts against the Python code sandbox (mtrl_jax.envs.code_sandbox).

Every attempt runs twice, side by side: with the audit hook (what training uses) and without it
(``audit_hook=False``: the OS isolation alone must stop it). An attempt counts as stopped when
the program started, printed no ``ESCAPED`` and no secret, and left nothing behind: no file
with its token outside the scratch folder (the host /tmp, a world-writable folder outside, the
repository, the interpreter's standard library), no process with its token in the command line
(scanned in /proc right after the call), no connection on the test's TCP/UDP/unix listeners,
and the harness, a victim process and both their rlimits unchanged.

Needs bubblewrap and user namespaces: without them the suite is skipped -- but fails in CI
(``CI`` set), where .ci/run installs Debian's bubblewrap. ``python tests/test_sandbox_escape.py``
runs it and prints the tally.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from mtrl_jax.envs import code_sandbox as cs
from mtrl_jax.envs.base import Task
from mtrl_jax.envs.code_sandbox import (
    CodeExecutionEnvironment,
    PythonLimits,
    SandboxUnavailable,
    run_python,
)
from mtrl_jax.envs.tools import ToolCall

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = PythonLimits(wall_s=2.0, cpu_s=1, memory_mb=256, file_mb=4, max_open_files=64)
SPAWN = dataclasses.replace(LIMITS, max_processes=8)  # room for children: the OS must cope
LAYERS = ("hook", "os")  # audit hook on (production) / off (isolation alone)
TALLY = {"tried": 0, "stopped": 0}


@pytest.fixture
def isolation():
    """Skip without bubblewrap/user namespaces -- fail instead in CI."""
    if not cs.sandbox_available():
        why = f"no OS-level sandbox here: {cs.sandbox_problem()}"
        if os.environ.get("CI"):
            pytest.fail(why + " (CI must install bubblewrap: see .ci/run)")
        pytest.skip(why)


# ------------------------------------------------------------------------------ the host


class Host:
    """What the attempts aim at: secrets, listeners, a victim process, a world-writable folder
    outside the sandbox; and the checks that nothing changed."""

    def __init__(self):
        self.secret = "s3cr3t-" + uuid.uuid4().hex
        self.outside = tempfile.mkdtemp(prefix="mtrl_outside_")
        os.chmod(self.outside, 0o777)  # only isolation, not permissions, keeps writes out
        self.secret_file = os.path.join(self.outside, "secret.txt")
        self.tmp_secret = f"/tmp/mtrl_secret_{uuid.uuid4().hex[:8]}"
        for path in (self.secret_file, self.tmp_secret):
            with open(path, "w") as f:
                f.write(self.secret)
            os.chmod(path, 0o644)
        self.old_env = os.environ.get("MTRL_ESCAPE_SECRET")
        os.environ["MTRL_ESCAPE_SECRET"] = self.secret
        # the victim runs as the sandbox's uid where it can: only the PID namespace, not
        # permissions, then keeps signals and prlimit away from it
        as_sandbox = {"user": cs.SANDBOX_UID, "group": cs.SANDBOX_UID} if os.geteuid() == 0 \
            else {}
        try:
            self.victim = subprocess.Popen(["sleep", "600"], start_new_session=True,
                                           **as_sandbox)
        except PermissionError:  # no CAP_SETUID: a victim of our own uid
            self.victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.usock_path = os.path.join(self.outside, "host.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.usock_path)
        os.chmod(self.usock_path, 0o777)
        self.abstract_name = "mtrl_abstract_" + uuid.uuid4().hex[:8]
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        for s in (self.tcp, self.unix, self.abstract):
            s.listen(8)
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.setblocking(False)
        plan = cs._probe()[0]
        sandbox_python = plan.python if plan else sys.executable
        self.watch_dirs = ["/", "/tmp", REPO, os.path.dirname(os.__file__),
                           os.path.join(os.path.dirname(os.path.dirname(sandbox_python)), "lib",
                                        f"python{sys.version_info[0]}.{sys.version_info[1]}")]

    def values(self, token: str) -> dict[str, str]:
        return {"@TOKEN@": token, "@OUTSIDE@": self.outside, "@HPID@": str(os.getpid()),
                "@VPID@": str(self.victim.pid), "@TCP@": str(self.tcp.getsockname()[1]),
                "@UDP@": str(self.udp.getsockname()[1]), "@USOCK@": self.usock_path,
                "@ABSTRACT@": self.abstract_name, "@REPO@": REPO, "@VENV@": sys.prefix,
                "@SECRETFILE@": self.secret_file, "@TMPSECRET@": self.tmp_secret}

    def rlimits(self) -> dict:
        """The harness's and the victim's rlimits (/proc/PID/limits: reading another uid's
        with prlimit would need CAP_SYS_RESOURCE, which a container's root may lack)."""
        out = {"harness": [resource.getrlimit(getattr(resource, n))
                           for n in dir(resource) if n.startswith("RLIMIT_")]}
        for who, pid in (("harness", os.getpid()), ("victim", self.victim.pid)):
            with open(f"/proc/{pid}/limits") as f:
                out[who + " /proc"] = f.read()
        return out

    def problems(self, token: str) -> list[str]:
        """Everything that shows a trace of the attempt ``token`` on the host."""
        found = []
        for d in self.watch_dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            found += [f"file {d}/{n}" for n in names if token in n]
        for root, dirs, files in os.walk(self.outside):
            found += [f"file {root}/{n}" for n in dirs + files if token in n]
        found += [f"process {pid}: {cmd}" for pid, cmd in processes_with(token)]
        if self.victim.poll() is not None or not os.path.exists(f"/proc/{self.victim.pid}"):
            found.append("the victim process died")
        for name, s in (("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract)):
            try:
                conn, _ = s.accept()
                conn.close()
                found.append(f"a connection reached the host's {name} listener")
            except BlockingIOError:
                pass
        try:
            data = self.udp.recv(4096)
            found.append(f"a datagram reached the host: {data!r}")
        except BlockingIOError:
            pass
        return found

    def close(self):
        self.victim.kill()
        self.victim.wait()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()
        shutil.rmtree(self.outside, ignore_errors=True)
        os.unlink(self.tmp_secret)
        if self.old_env is None:
            os.environ.pop("MTRL_ESCAPE_SECRET", None)
        else:
            os.environ["MTRL_ESCAPE_SECRET"] = self.old_env


def processes_with(marker: str) -> list[tuple[int, str]]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmd:
            out.append((int(pid), cmd[:200]))
    return out


@pytest.fixture(scope="module")
def host():
    h = Host()
    yield h
    h.close()


# ---------------------------------------------------------------------------- attempts

# Each program starts with PRE. ``escaped(...)`` prints a marker built at run time, so a
# traceback quoting the source line never contains it.
PRE = ("print('STARTED', flush=True)\n"
       "def escaped(*a):\n    print('ESC' + 'APED', *a, flush=True)\n")


@dataclasses.dataclass(frozen=True)
class Attempt:
    name: str
    code: str
    limits: PythonLimits = LIMITS
    stopped_by: tuple | None = None  # acceptable ``stopped_by`` values, when it matters
    wait_s: float = 0.0  # look again after this long (delayed effects of a survivor)


A = Attempt
# after ``spec``: load the extension and start a process through it
SPAWN_VIA_MODULE = (
    "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\n"
    "sys.modules['_posixsubprocess'] = m\nimport subprocess\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', '@TOKEN@'])\n"
    "escaped()")
ATTEMPTS = [
    # --- reading the host
    A("read /etc/shadow", "escaped(open('/etc/shadow').read())"),
    A("read /etc/passwd", "escaped(open('/etc/passwd').read())"),
    A("list /root", "import os\nescaped(os.listdir('/root'))"),
    A("list /home", "import os\nescaped(os.listdir('/home'))"),
    A("read the repository", "escaped(open('@REPO@/pyproject.toml').read())"),
    A("list the repository", "import os\nescaped(os.listdir('@REPO@'))"),
    A("read the venv", "escaped(open('@VENV@/pyvenv.cfg').read())"),
    A("read a world-readable host file", "escaped(open('@SECRETFILE@').read())"),
    A("read the host /tmp", "escaped(open('@TMPSECRET@').read())"),
    A("env secrets", "import os\nprint(dict(os.environ))\n"
      "if 'MTRL_ESCAPE_SECRET' in os.environ: escaped()"),
    A("host /proc environ", "escaped(open('/proc/1/environ').read())"),
    A("host pids in /proc", "import os\nescaped(os.listdir('/proc/@HPID@'))"),
    A("read via a symlink", "import os\nos.symlink('@SECRETFILE@', 'ln')\n"
      "escaped(open('ln').read())"),
    # --- writing outside the scratch folder
    A("open for writing", "open('@OUTSIDE@/w_@TOKEN@', 'w').write('x')"),
    A("write the host /tmp", "open('/tmp/w_@TOKEN@', 'w').write('x')"),
    A("write the repository", "open('@REPO@/w_@TOKEN@', 'w').write('x')"),
    A("write the stdlib", "import os\n"
      "open(os.path.join(os.path.dirname(os.__file__), 'w_@TOKEN@.py'), 'w').write('x')"),
    A("os.open O_CREAT", "import os\nos.open('@OUTSIDE@/o_@TOKEN@', os.O_CREAT | os.O_WRONLY)"),
    A("os.open dir_fd outside", "import os\n"
      "d = os.open('@OUTSIDE@', os.O_RDONLY | os.O_DIRECTORY)\n"
      "os.open('d_@TOKEN@', os.O_CREAT | os.O_WRONLY, dir_fd=d)"),
    A("os.open dir_fd stdlib", "import os\n"
      "d = os.open(os.path.dirname(os.__file__), os.O_RDONLY | os.O_DIRECTORY)\n"
      "os.open('d_@TOKEN@.py', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=d)"),
    A("rename outside", "open('f', 'w').write('x')\nimport os\n"
      "os.rename('f', '@OUTSIDE@/r_@TOKEN@')"),
    A("link outside", "open('f', 'w').write('x')\nimport os\n"
      "os.link('f', '@OUTSIDE@/l_@TOKEN@')"),
    A("symlink outside", "import os\nos.symlink('/etc/passwd', '@OUTSIDE@/s_@TOKEN@')"),
    A("write through a symlink", "import os\nos.symlink('@OUTSIDE@/t_@TOKEN@', 'ln')\n"
      "open('ln', 'w').write('x')"),
    A("sqlite3.connect outside", "import sqlite3\n"
      "sqlite3.connect('@OUTSIDE@/db_@TOKEN@').execute('create table t(x)')"),
    A("sqlite3 ATTACH outside", "import sqlite3\nc = sqlite3.connect(':memory:')\n"
      "c.execute(\"attach database '@OUTSIDE@/att_@TOKEN@' as a\")\n"
      "c.execute('create table a.t(x)')"),
    A("shutil.copy outside", "import shutil\nshutil.copy('main.py', '@OUTSIDE@/cp_@TOKEN@')"),
    # --- network
    A("tcp to the host", "import socket\n"
      "socket.create_connection(('127.0.0.1', @TCP@), timeout=1)\nescaped()"),
    A("udp to the host", "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
      "s.sendto(b'@TOKEN@', ('127.0.0.1', @UDP@))"),
    A("unix socket of the host", "import socket\ns = socket.socket(socket.AF_UNIX)\n"
      "s.connect('@USOCK@')\nescaped()"),
    A("abstract unix socket", "import socket\ns = socket.socket(socket.AF_UNIX)\n"
      "s.connect('\\0@ABSTRACT@')\nescaped()"),
    A("internet", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n"
      "escaped()"),
    # --- processes
    A("os.system", "import os\nos.system('echo ESC\"\"APED; sleep 30 # @TOKEN@')"),
    A("subprocess /bin/sh", "import subprocess\n"
      "subprocess.run(['/bin/sh', '-c', 'echo ESC\"\"APED; sleep 30 # @TOKEN@'])"),
    A("fork + exec", "import os, sys\npid = os.fork()\nif pid == 0:\n"
      "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)',"
      " '@TOKEN@'])\nescaped(pid)"),
    A("exec /bin/sh", "import os\nos.execv('/bin/sh', ['/bin/sh', '-c', 'echo ESC\"\"APED'])"),
    A("_posixsubprocess renamed", "import glob, importlib.util, sys\n"
      "so = glob.glob(sys.path[-1] + '/_posixsubprocess*.so')[0]\n"
      "spec = importlib.util.spec_from_file_location('evil._posixsubprocess', so)\n"
      + SPAWN_VIA_MODULE),
    A("_posixsubprocess copied", "import glob, importlib.util, shutil, sys\n"
      "so = glob.glob(sys.path[-1] + '/_posixsubprocess*.so')[0]\n"
      "shutil.copy(so, 'x.so')\n"
      "spec = importlib.util.spec_from_file_location('x._posixsubprocess', 'x.so')\n"
      + SPAWN_VIA_MODULE),
    A("fork bomb", "import os\nwhile True:\n    os.fork()"),
    A("fork bomb with room", "import os, sys\nfor i in range(50):\n    try:\n"
      "        if os.fork() == 0:\n"
      "            os.execv(sys.executable, [sys.executable, '-c',"
      " 'import time; time.sleep(30)', '@TOKEN@'])\n"
      "    except OSError:\n        pass", limits=SPAWN),
    A("double-fork daemon", "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n"
      "    if os.fork() == 0:\n"
      "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1);"
      " open(\"late_@TOKEN@\", \"w\").write(\"x\")', '@TOKEN@'])\n    os._exit(0)\n"
      "time.sleep(0.3)", limits=SPAWN, wait_s=1.5),
    A("child holding the pipe", "import os, sys\nif os.fork() == 0:\n"
      "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)',"
      " '@TOKEN@'])\nprint('parent leaves')", limits=SPAWN),
    # --- the harness: signals and limits
    A("kill the harness", "import os\nos.kill(@HPID@, 9)\nescaped()"),
    A("kill the victim", "import os\nos.kill(@VPID@, 9)\nescaped()"),
    A("kill the parent", "import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)"),
    A("kill everything", "import os\nos.kill(-1, 9)"),
    A("pidfd_send_signal", "import os, signal\nfd = os.pidfd_open(@HPID@)\n"
      "signal.pidfd_send_signal(fd, 9)\nescaped()"),
    A("prlimit the harness", "import resource\n"
      "resource.prlimit(@HPID@, resource.RLIMIT_NOFILE, (3, 3))\nescaped()"),
    A("prlimit the victim", "import resource\n"
      "resource.prlimit(@VPID@, resource.RLIMIT_CPU, (0, 0))\nescaped()"),
    A("setpgid", "import os\nos.setpgid(@HPID@, @HPID@)\nescaped()"),
    A("raise own limits", "import resource\n"
      "resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\nescaped()"),
    A("raise own process limit", "import resource\n"
      "resource.setrlimit(resource.RLIMIT_NPROC, (10000, 10000))\nescaped()"),
    # --- resources
    A("memory bomb", "x = bytearray(8 << 30)", stopped_by=("memory_limit",)),
    A("growing memory", "a = []\nwhile True:\n    a.append(' ' * 10**7)",
      stopped_by=("memory_limit",)),
    A("cpu bomb", "while True:\n    pass", stopped_by=("cpu_limit",),
      limits=dataclasses.replace(LIMITS, wall_s=60.0)),  # the CPU limit, even on a busy host
    A("sleeping", "import time\ntime.sleep(30)", stopped_by=("wall_timeout",)),
    A("file size bomb", "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)",
      stopped_by=("file_limit",)),
    A("tmpfs bomb", "i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 10**6)\n"
      "    i += 1"),
    A("open files bomb", "fs = [open('main.py') for _ in range(100000)]\nescaped()"),
    A("output flood", "while True:\n    print('x' * 100000)",
      stopped_by=("cpu_limit", "wall_timeout")),
    # --- the kernel
    A("ptrace", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
      "if libc.ptrace(16, 1, 0, 0) == 0: escaped()"),
    A("setuid 0", "import os\nos.setuid(0)\nescaped()"),
    A("mount", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
      "if libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0: escaped()"),
    A("new user namespace", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
      "if libc.unshare(0x10000000) == 0: escaped()"),
    A("chroot", "import os\nos.chroot('/tmp')\nescaped()"),
    A("subinterpreter", "import _xxsubinterpreters as s\n"
      "s.run_string(s.create(), 'open(\"@OUTSIDE@/sub_@TOKEN@\", \"w\")')"),
]


def _run_attempt(attempt: Attempt, layer: str, host: Host) -> tuple[str, cs.PythonResult, str]:
    token = f"mtrlesc{uuid.uuid4().hex[:12]}"
    code = PRE + attempt.code
    for key, value in host.values(token).items():
        code = code.replace(key, value)
    scratch = tempfile.mkdtemp(prefix="mtrl_escape_scratch_", dir=cs._scratch_base(cs._probe()[0]))
    try:
        r = run_python(code, limits=attempt.limits, workdir=scratch,
                       audit_hook=layer == "hook")
        if attempt.wait_s:
            problems = host.problems(token)
            time.sleep(attempt.wait_s)
        late = [f"file {n} appeared in the scratch later" for n in os.listdir(scratch)
                if token in n]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return token, r, "; ".join(late + (problems if attempt.wait_s else []))


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.name for a in ATTEMPTS])
def test_escape_attempt_is_stopped(attempt, host, isolation):
    limits_before = host.rlimits()
    with ThreadPoolExecutor(len(LAYERS)) as pool:
        runs = dict(zip(LAYERS, pool.map(lambda layer: _run_attempt(attempt, layer, host),
                                         LAYERS), strict=True))
    for layer, (token, r, late) in runs.items():
        TALLY["tried"] += 1
        where = (f"{attempt.name} [{layer}]: rc={r.returncode} stopped_by={r.stopped_by} "
                 f"stdout={r.stdout[-300:]!r} stderr={r.stderr[-600:]!r}")
        out = r.stdout + r.stderr
        started = "STARTED" in r.stdout or attempt.name == "output flood"  # tail kept only
        assert started, f"the program did not start: {where}"
        assert r.isolated and r.stopped_by != "sandbox_error", where
        assert "ESCAPED" not in out, where
        assert host.secret not in out, where
        problems = host.problems(token)
        assert not problems and not late, f"{where}\n{problems} {late}"
        if attempt.stopped_by:
            assert r.stopped_by in attempt.stopped_by, where
        assert len(r.stdout) <= 20000 and len(r.stderr) <= 20000
        TALLY["stopped"] += 1
    assert os.path.exists(f"/proc/{os.getpid()}")
    assert host.rlimits() == limits_before


def test_escape_tally(capsys, isolation):
    """Printed (``-s``) for the record; under pytest-xdist each process sees its share."""
    with capsys.disabled():
        print(f"\nsandbox escape attempts: {TALLY['tried']} tried, {TALLY['stopped']} stopped "
              f"({len(ATTEMPTS)} attempts x {len(LAYERS)} layers)")
    assert TALLY["stopped"] == TALLY["tried"]


# ------------------------------------------------------------------------ worker killed

WORKER = r'''
import asyncio, sys
from mtrl_jax.envs.base import Task
from mtrl_jax.envs.code_sandbox import CodeExecutionEnvironment, PythonLimits, run_python
from mtrl_jax.envs.tools import ToolCall
mode, marker = sys.argv[1], sys.argv[2]
code = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
    "'" + marker + "_bg'])\n"
    "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
    "'" + marker + "_main'])\n")
limits = PythonLimits(wall_s=60, cpu_s=30, max_processes=4)
if mode == "direct":
    run_python(code, limits=limits, audit_hook=False)
else:  # the environment: the call runs in a to_thread worker thread
    async def main():
        env = CodeExecutionEnvironment(limits, audit_hook=False)
        await env.setup(Task(id="t", family="code", name="t", prompt=""))
        await env.call_tool(ToolCall("run_python", {"code": code}))
    asyncio.run(main())
'''


def _wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.mark.parametrize("mode", ["direct", "to_thread"])
def test_killed_worker_leaves_no_survivor(mode, isolation):
    """SIGKILL the rollout worker mid-call: bwrap gets the parent-death signal (set by
    --die-with-parent; it fires when the *thread* that started bwrap exits, which here is the
    worker thread of asyncio.to_thread -- killed with its process), its init dies and the
    kernel kills the whole PID namespace: a setsid() background sleeper included."""
    marker = f"mtrlworker{uuid.uuid4().hex[:12]}"
    # a killed worker runs no teardown: its scratch folder goes into ours (one the sandbox's
    # uid can reach: pytest's tmp_path lies under a 0700 folder)
    tmp = tempfile.mkdtemp(prefix="mtrl_worker_tmp_")
    os.chmod(tmp, 0o711)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, mode, marker],
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": tmp})
    try:
        started = _wait_for(lambda: len(processes_with(marker)) >= 2, 30)
        assert started, (f"the sandboxed processes never appeared: "
                         f"{worker.poll()} {worker.stderr.read() if worker.poll() else ''}")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        gone = _wait_for(lambda: not processes_with(marker), 5)
        assert gone, f"survivors after the worker died: {processes_with(marker)}"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stderr.close()
        for pid, _ in processes_with(marker):  # never leave them to the rest of the suite
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def test_call_from_short_lived_thread(isolation):
    """The thread that starts bwrap waits for it in run_python, so the parent-death signal
    cannot fire early; after the thread ends nothing of the call is left."""
    marker = f"mtrlthread{uuid.uuid4().hex[:12]}"
    code = ("import os, sys, time\nif os.fork() == 0:\n    os.execv(sys.executable, "
            f"[sys.executable, '-c', 'import time; time.sleep(30)', '{marker}'])\n"
            "time.sleep(0.5)\nprint('done')")
    box = {}
    t = threading.Thread(target=lambda: box.update(r=run_python(code, limits=SPAWN,
                                                                audit_hook=False)))
    t.start()
    t.join(10)
    assert box["r"].ok and box["r"].stdout == "done\n", box["r"]
    assert not processes_with(marker)


# ------------------------------------------------------------------------- environment


def test_code_environment_runs_isolated_calls_in_one_scratch(isolation):
    async def episode():
        env = CodeExecutionEnvironment(LIMITS)
        await env.setup(Task(id="c", family="code", name="demo", prompt="",
                             expected={"answer": 6}))
        assert [t.name for t in env.tools()] == ["run_python"]
        scratch = env.scratch
        first = await env.call_tool(ToolCall("run_python", {
            "code": "open('n.txt', 'w').write('6')\nimport os\nprint(os.getcwd(), os.getuid())"}))
        second = await env.call_tool(ToolCall("run_python", {
            "code": "print(int(open('n.txt').read()) * 1)"}))
        blocked = await env.call_tool(ToolCall("run_python", {
            "code": f"print(open('{REPO}/pyproject.toml').read())"}))
        both = await asyncio.gather(*(env.call_tool(ToolCall("run_python", {
            "code": f"print({i})"})) for i in range(3)))
        assert os.path.isdir(scratch)
        await env.teardown()
        return first, second, blocked, both, scratch

    first, second, blocked, both, scratch = asyncio.run(episode())
    assert first.strip() == f"{cs.SCRATCH} {cs.SANDBOX_UID}"
    assert second.strip() == "6"
    assert blocked.startswith("Execution stopped")
    assert [b.strip() for b in both] == ["0", "1", "2"]
    assert not os.path.exists(scratch)


def test_code_environment_teardown_stops_a_running_call(isolation):
    marker = f"mtrlteardown{uuid.uuid4().hex[:12]}"

    async def episode():
        env = CodeExecutionEnvironment(PythonLimits(wall_s=30, cpu_s=10))
        await env.setup(Task(id="c", family="code", name="demo", prompt=""))
        call = asyncio.ensure_future(env.run(f"import time\n'{marker}'\ntime.sleep(30)"))
        assert await asyncio.to_thread(_wait_for, lambda: bool(env._live), 10)
        t0 = time.monotonic()
        call.cancel()
        await env.teardown()
        return time.monotonic() - t0, env.scratch

    took, scratch = asyncio.run(episode())
    assert took < 5 and not os.path.exists(scratch)


def test_scratch_folders_the_sandbox_uid_cannot_reach(isolation, tmp_path, monkeypatch):
    """As root, bwrap starts as uid 65534 and must walk down to the scratch folder: pytest's
    tmp_path (under a 0700 folder) is refused with a clear error, and a TMPDIR there does not
    stop the default scratch folders (they move to /tmp)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    if cs._drops(cs._probe()[0]) and not cs._reachable(str(workdir)):
        with pytest.raises(ValueError, match="not reachable by uid 65534"):
            run_python("print(1)", workdir=str(workdir))
    else:
        assert run_python("print(1)", workdir=str(workdir)).stdout == "1\n"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_python("print(2)", limits=LIMITS).stdout == "2\n"


# ------------------------------------------------------------------------ no isolation


@pytest.fixture
def no_sandbox(monkeypatch):
    """Pretend bubblewrap is missing (these tests need no sandbox)."""
    monkeypatch.setattr(cs, "_probe_result", (None, "bubblewrap is not installed (test)"))
    monkeypatch.setattr(cs, "_warned", False)
    monkeypatch.delenv(cs.ALLOW_UNISOLATED_ENV, raising=False)


def test_unavailable_sandbox_is_an_error_by_default(no_sandbox):
    with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
        run_python("print(1)")
    env = CodeExecutionEnvironment()
    with pytest.raises(SandboxUnavailable, match=cs.ALLOW_UNISOLATED_ENV):
        asyncio.run(env.setup(Task(id="c", family="code", name="demo", prompt="")))


@pytest.mark.parametrize("opt_in", ["argument", "env"])
def test_unisolated_fallback_is_explicit_and_warns_once(no_sandbox, monkeypatch, opt_in):
    kwargs = {"allow_unisolated": True} if opt_in == "argument" else {}
    if opt_in == "env":
        monkeypatch.setenv(cs.ALLOW_UNISOLATED_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = run_python("print(6 * 7)", limits=LIMITS, **kwargs)
        fork = run_python("import os\nos.fork()", limits=LIMITS, **kwargs)
        # a wall budget far above the CPU budget: on a loaded machine the loop may get well
        # under one core, and the CPU limit must still be the one that fires
        spin = run_python("while True:\n    pass",
                          limits=dataclasses.replace(LIMITS, wall_s=60.0), **kwargs)
    assert ok.ok and ok.stdout == "42\n" and not ok.isolated
    assert fork.stopped_by == "sandbox_violation" and spin.stopped_by == "cpu_limit"
    risky = [w for w in caught if "WITHOUT OS-level isolation" in str(w.message)]
    assert len(risky) == 1 and "network" in str(risky[0].message)


def test_seccomp_filter_is_well_formed():
    for no_fork in (False, True):
        prog = cs._seccomp_filter(no_fork)
        if prog is None:
            pytest.skip("no syscall table for this architecture")
        assert len(prog) % 8 == 0 and len(prog) // 8 < 256


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
