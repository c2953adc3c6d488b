"""Asynchronous rollouts: rollout worker processes and the trainer-side pool that feeds a
staleness-bounded queue (``async_config.max_steps_off_policy = k``).

Processes
---------
Each worker is a real OS process: a fresh interpreter (``python -c ...``, its own session, its
own JAX runtime) that never imports the trainer's ``__main__`` -- so scripts need no
``if __name__ == "__main__"`` guard, but a custom ``make_env`` must be importable by name (a
module-level function of a module, not of the script). It rebuilds the base model from the
run's config (a local checkpoint or the seeded tiny model), proves it holds the trainer's base
(:func:`base_fingerprint`), and from then on receives only LoRA weights, once per policy
version. It runs one training step's rollout at a time
(:meth:`RolloutRunner.rollout_step`, the lockstep round the synchronous trainer plays) with
the newest weights it holds.

Protocol (one pipe each way per worker; messages are pickled tuples)
--------------------------------------------------------------------
trainer -> worker, in order:

``("weights", version, lora)``
    ``lora``: the LoRA parameters as a nested dict of numpy arrays (``nnx`` pure dict). Sent to
    every live worker when a version is published, and first thing to a new worker.
``("work", step, attempt, tasks)``
    the rollout of training step ``step`` (``tasks``: its ``batch_size`` tasks). A step is sent
    again with ``attempt + 1`` when the worker holding it died.
``("stop",)``
    finish and exit.

worker -> trainer:

``("ready", pid, base_fingerprint, startup_seconds)``
``("heartbeat", unix_time)``    every ``heartbeat_s`` (a worker silent for ``heartbeat_timeout_s``
    is killed and replaced)
``("result", step, attempt, trajectories, info)``    ``info``: start/end policy versions,
    seconds
``("error", traceback_text)``    the worker failed; the trainer raises
    :class:`RolloutWorkerError` with the worker's traceback.

Admission and accounting are :class:`~mtrl_jax.rollout.scheduler.StalenessScheduler`'s: a step
is dispatched once version ``step - k`` exists, a result is admitted only from the attempt it is
assigned to and only when every episode started on version ``>= step - k``, and a dead worker's
steps run again. Faults: a worker killed by a signal (its pipe reaches EOF, its exit code is
set) or silent past the heartbeat timeout is noticed by the pool's monitor thread within a
fraction of a second (or the timeout), its processes -- including environment children, found by
the ``MTRL_ROLLOUT_WORKER`` token in their environment -- are killed, its scratch folder (the
worker's ``TMPDIR``: sandboxes and SQLite files live there) is removed, and a new worker takes
its steps. Workers share a persistent XLA compilation cache (``$MTRL_DATA_DIR/xla_cache`` unless
``JAX_COMPILATION_CACHE_DIR`` is set), so a replacement -- or the next run's worker -- starts
without compiling again. Workers die with the
trainer: ``PR_SET_PDEATHSIG`` on Linux, EOF on the weight pipe
otherwise, and :meth:`ProcessRolloutPool.close` (run by the trainer on every exit path and at
interpreter exit).

:class:`InProcessRolloutPool` runs the same schedule in the trainer's process for debugging:
each step's rollout is generated as soon as it is admissible, so every step sees the maximal
staleness ``k``, deterministically.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_connections
from typing import Any

import numpy as np

from mtrl_jax.rollout.scheduler import Admitted, StalenessScheduler
from mtrl_jax.rollout.sources import StepRollout

__all__ = ["InProcessRolloutPool", "ProcessRolloutPool", "RolloutWorkerError", "start_version",
           "worker_main"]


class RolloutWorkerError(RuntimeError):
    """A rollout worker failed; the message holds the worker's traceback."""


def start_version(trajectories) -> int:
    """The oldest policy version any episode started on (first sampled token of each)."""
    out = None
    for t in trajectories:
        for s in t.samples:
            v = next((v for v, m in zip(s.policy_version, s.loss_mask, strict=True) if m), None)
            if v is not None:
                out = v if out is None else min(out, v)
                break
    return -1 if out is None else int(out)


def lora_to_numpy(lora_state) -> dict:
    """An ``nnx.State`` of LoRA parameters as a picklable nested dict of numpy arrays."""
    import jax

    return jax.tree.map(np.asarray, lora_state.to_pure_dict())


# ====================================================================== the worker process


@dataclasses.dataclass
class WorkerSpec:
    worker_id: int
    config: Any                      # TrainConfig
    make_env: Callable | None
    scratch: str
    token: str
    parent_pid: int  # -1: not a child of the trainer (a Ray actor)
    heartbeat_s: float = 1.0
    # a worker process exits on a fatal error (its pipes are gone); a thread in a Ray actor
    # returns instead, so that its last message (the error) is still read
    exit_on_error: bool = True


def _die_with_parent(parent_pid: int) -> None:
    if parent_pid < 0:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def _entry() -> None:
    """``python -c 'from mtrl_jax.rollout.worker import _entry; _entry()' FD_IN FD_OUT``: the
    first message is the trainer's ``sys.path``, the second the :class:`WorkerSpec`."""
    from multiprocessing.connection import Connection

    cmd = Connection(int(sys.argv[1]), writable=False)
    out = Connection(int(sys.argv[2]), readable=False)
    for p in cmd.recv():
        if p not in sys.path:
            sys.path.append(p)
    worker_main(cmd.recv(), cmd, out)


def worker_main(spec: WorkerSpec, cmd_conn, out_conn) -> None:
    """Entry point of a rollout worker process (see the module docstring)."""
    os.environ["MTRL_ROLLOUT_WORKER"] = spec.token
    os.makedirs(spec.scratch, exist_ok=True)
    os.environ["TMPDIR"] = spec.scratch
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import tempfile

    tempfile.tempdir = spec.scratch
    _die_with_parent(spec.parent_pid)
    send_lock = threading.Lock()

    def send(msg) -> None:
        try:
            with send_lock:
                out_conn.send(msg)
        except (BrokenPipeError, OSError):
            os._exit(1)  # the trainer is gone

    inbox: queue.Queue = queue.Queue()
    weights_lock = threading.Lock()
    latest: list = [None]  # the newest ("weights", version, lora) message received

    def reader() -> None:  # drains the command pipe so the trainer never blocks on a send
        try:
            while True:
                msg = cmd_conn.recv()
                if msg[0] == "weights":
                    with weights_lock:
                        latest[0] = msg
                else:
                    inbox.put(msg)
        except (EOFError, OSError):
            os._exit(1)  # the trainer is gone

    def heartbeat() -> None:
        while True:
            time.sleep(spec.heartbeat_s)
            send(("heartbeat", time.time()))

    threading.Thread(target=reader, daemon=True, name="mtrl-worker-reader").start()
    threading.Thread(target=heartbeat, daemon=True, name="mtrl-worker-heartbeat").start()
    try:
        t0 = time.perf_counter()
        from mtrl_jax.envs.families import import_user_modules
        from mtrl_jax.rollout.runner import RolloutRunner, base_fingerprint, build_policy

        import_user_modules(spec.config.data.imports)

        tokenizer, model = build_policy(spec.config)
        runner = RolloutRunner(spec.config, tokenizer, model, spec.make_env)
        runner.sampler.policy_version = -1  # the trainer's first weights always load
        send(("ready", os.getpid(), base_fingerprint(model), time.perf_counter() - t0))

        def load_newest() -> None:
            with weights_lock:
                msg = latest[0]
            if msg is not None and msg[1] > runner.sampler.policy_version:
                runner.sampler.update_weights(msg[2], msg[1])

        if spec.config.async_config.partial_rollouts:
            runner.sampler.before_decode = load_newest
        while True:
            msg = inbox.get()
            if msg[0] == "stop":
                break
            _, step, attempt, tasks = msg
            # weights travel before the work that needs them, and the reader thread keeps
            # their order: the newest weights here are at least the step's minimum version
            load_newest()
            t1 = time.perf_counter()
            v0 = runner.sampler.policy_version
            trajs = runner.rollout_step(step, tasks)
            sv = start_version(trajs)  # -1: no episode sampled anything (all failed early)
            send(("result", step, attempt, trajs,
                  {"start_version": sv if sv >= 0 else v0, "dispatch_version": v0,
                   "end_version": runner.sampler.policy_version,
                   "seconds": time.perf_counter() - t1,
                   "step_metrics": dict(runner.step_metrics)}))
        runner.close()
    except BaseException:
        send(("error", traceback.format_exc()))
        out_conn.close()
        if spec.exit_on_error:
            os._exit(1)
        return
    out_conn.close()


# ====================================================================== the trainer side


@dataclasses.dataclass
class _Worker:
    wid: int
    proc: Any
    cmd: Any           # Connection, trainer -> worker
    out: Any           # Connection, worker -> trainer
    scratch: str
    token: str
    started: float
    last_seen: float
    outbox: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    ready: bool = False
    pid: int | None = None
    startup_s: float | None = None
    fingerprint: float | None = None


class ProcessRolloutPool:
    """Rollout worker processes behind a :class:`StalenessScheduler`.

    Two phases: :meth:`launch` starts the processes (they boot, build the base model and wait),
    so a trainer launches them first thing and they boot while it builds its own state;
    :meth:`start` then hands over the schedule and the first weights.

    Args:
      config: the run's TrainConfig (``async_config`` holds k, the worker count and timeouts).
      make_env: picklable ``make_env(task)`` (a module-level function) or None (task family).
      scratch_root: folder for the workers' scratch folders.
      log: progress/fault messages.
    """

    def __init__(self, config, *, make_env: Callable | None, scratch_root: str,
                 log: Callable[[str], None] | None = None):
        a = config.async_config
        self.config = config
        self.tasks_for: Callable[[int], Sequence] | None = None
        self.make_env = make_env
        self.scratch_root = scratch_root
        from mtrl_jax.envs.families import data_dir

        self.compile_cache = os.path.join(data_dir(), "xla_cache")
        self.fingerprint: float | None = None
        self.started = False
        self.log = log or (lambda msg: print(f"[mtrl] {msg}", file=sys.stderr, flush=True))
        self.sched = StalenessScheduler(a.max_steps_off_policy, 0, 0)  # replaced by start()
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self.deaths: list[tuple[int, str, float]] = []  # (worker id, why, time.time())
        self.failure: BaseException | None = None
        self._weights: tuple[int, dict] | None = None
        self._next_id = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._monitor: threading.Thread | None = None
        self.weights_sent: list[tuple[int, int, int]] = []  # (worker, version, floats)
        if make_env is not None:
            import pickle

            try:
                if getattr(make_env, "__module__", None) == "__main__":
                    raise TypeError("it is defined in __main__, which a worker does not import")
                pickle.dumps(make_env)
            except Exception as e:
                raise ValueError(
                    "async rollouts in worker processes need a picklable make_env (a "
                    f"module-level function); got {make_env!r} ({e}). Use "
                    "async_config.mode=inprocess to debug with a local function.") from e
        atexit.register(self.close)

    # ------------------------------------------------------------------ trainer API

    def launch(self) -> None:
        """Start the worker processes (idempotent); they boot and wait for :meth:`start`."""
        with self._lock:
            if self._monitor is not None:
                return
            for _ in range(self.config.async_config.num_workers):
                self._spawn()
        self._monitor = threading.Thread(target=self._run_monitor, daemon=True,
                                         name="mtrl-rollout-monitor")
        self._monitor.start()

    def start(self, version: int, lora_state, *, tasks_for: Callable[[int], Sequence],
              first_step: int, last_step: int,
              base_fingerprint: Callable[[], float] | None = None) -> None:
        """Serve steps ``first_step .. last_step - 1`` (``tasks_for(step)`` -> the step's
        tasks) from policy ``version``; workers must hold the base whose checksum
        ``base_fingerprint()`` returns."""
        if self.started:
            return
        self.launch()
        with self._lock:
            self.started = True
            self.tasks_for = tasks_for
            self.fingerprint = None if base_fingerprint is None else base_fingerprint()
            self.sched = StalenessScheduler(self.config.async_config.max_steps_off_policy,
                                            first_step, last_step)
            self.sched.publish(version)
            self._weights = (version, lora_to_numpy(lora_state))
            for w in self.workers.values():
                self.sched.add_worker(w.wid)
                self._send_weights(w)
                if w.fingerprint is not None:
                    self._check_fingerprint(w)
            self._dispatch()

    def publish(self, version: int, lora_state) -> None:
        """A new policy version: its LoRA weights go to every live worker (once)."""
        lora = lora_to_numpy(lora_state)
        with self._lock:
            self._weights = (version, lora)
            self.sched.publish(version)
            for w in list(self.workers.values()):
                self._send_weights(w)
            self._dispatch()

    def episodes(self, step: int) -> StepRollout:
        """The admitted rollout of ``step`` (blocks until there is one)."""
        r, m = self.get(step)
        trajs, info = r.payload
        info = dict(info)
        m = {**info.pop("step_metrics", {}), **m}
        return StepRollout(trajs, {**info, "worker": r.worker, "attempt": r.attempt}, m,
                           float(info.get("seconds", 0.0)))

    def get(self, step: int, timeout_s: float | None = None) -> tuple[Admitted, dict]:
        """Block until the rollout of ``step`` is admitted; ``(admitted, metrics)``."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                if self.failure is not None:
                    raise self.failure
                r = self.sched.take(step)
                if r is not None:
                    break
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    raise TimeoutError(f"no rollout for step {step} after {timeout_s} s")
                self._cond.wait(0.5)
            m = {"async/wait_s": time.perf_counter() - t0,
                 "async/worker_restarts": float(self.restarts),
                 "async/requeued_steps": float(self.sched.requeued),
                 "async/dropped_results": float(self.sched.dropped),
                 "async/rejected_results": float(self.sched.rejected),
                 "async/ready_ahead": float(len(self.sched.done))}
        return r, m

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL) and remove their scratch folders."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self.workers.values())
            self.workers.clear()
            for w in workers:
                self._send(w, ("stop",), quiet=True)
        deadline = time.time() + 5.0
        for w in workers:
            try:
                w.proc.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for w in workers:
            self._reap(w)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(2.0)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self.workers.values() if w.proc.pid is not None]

    # ------------------------------------------------------------------ internals

    def _spawn(self) -> _Worker:
        from multiprocessing.connection import Connection

        wid = self._next_id
        self._next_id += 1
        token = f"{os.getpid()}-{wid}-{uuid.uuid4().hex[:8]}"
        scratch = os.path.join(self.scratch_root, f"worker{wid}-{token}")
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        spec = WorkerSpec(wid, self.config, self.make_env, scratch, token, os.getpid(),
                          self.config.async_config.heartbeat_s)
        env = {**os.environ, "MTRL_ROLLOUT_WORKER": token}
        # a restarted worker reads its compiled programs back instead of compiling again
        env.setdefault("JAX_COMPILATION_CACHE_DIR", self.compile_cache)
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from mtrl_jax.rollout.worker import _entry; _entry()",
             str(cmd_r), str(out_w)], pass_fds=(cmd_r, out_w), env=env,
            start_new_session=True)  # Ctrl-C reaches the trainer, which stops the workers
        os.close(cmd_r)
        os.close(out_w)
        now = time.time()
        w = _Worker(wid, proc, Connection(cmd_w, readable=False),
                    Connection(out_r, writable=False), scratch, token, now, now)
        threading.Thread(target=self._sender, args=(w,), daemon=True,
                         name=f"mtrl-rollout-sender-{wid}").start()
        self.workers[wid] = w
        self.sched.add_worker(wid)  # (before start(): a placeholder schedule that serves none)
        self._send(w, [p for p in sys.path if p])
        self._send(w, spec)
        if self._weights is not None:  # started: a replacement gets the current weights
            self._send_weights(w)
        return w

    def _send_weights(self, w: _Worker) -> None:
        import jax

        version, lora = self._weights
        self._send(w, ("weights", version, lora))
        self.weights_sent.append((w.wid, version, sum(x.size for x in jax.tree.leaves(lora))))

    def _send(self, w: _Worker, msg, quiet: bool = False) -> None:
        """Queue ``msg`` for ``w``'s sender thread: a worker that stopped reading (hung, or
        its pipe full) never blocks the trainer or the monitor."""
        w.outbox.put(msg)

    @staticmethod
    def _sender(w: _Worker) -> None:
        while True:
            msg = w.outbox.get()
            if msg is None:
                return
            try:
                w.cmd.send(msg)
            except (BrokenPipeError, OSError, ValueError):
                return  # the worker is gone; the monitor notices on the other pipe

    def _dispatch(self) -> None:
        for a in self.sched.dispatch():
            w = self.workers[a.worker]
            self._send(w, ("work", a.step, a.attempt, list(self.tasks_for(a.step))))

    def _run_monitor(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                conns = {w.out: w for w in self.workers.values()}
            ready = wait_connections(list(conns), timeout=0.2) if conns else []
            if not conns:
                time.sleep(0.2)
            with self._cond:
                if self._closed:
                    return
                for conn in ready:
                    w = conns[conn]
                    if w.wid not in self.workers:
                        continue
                    try:
                        while conn.poll():
                            self._handle(w, conn.recv())
                    except (EOFError, OSError):
                        self._died(w, "pipe closed")
                    except Exception:
                        self.failure = RolloutWorkerError(
                            f"reading from rollout worker {w.wid}:\n{traceback.format_exc()}")
                for w in list(self.workers.values()):
                    if w.proc.poll() is not None and w.wid in self.workers and \
                            not w.out.poll():
                        self._died(w, "process exited")
                    else:
                        self._check_timeouts(w)
                self._cond.notify_all()

    def _check_timeouts(self, w: _Worker) -> None:
        """Replace ``w`` when it has been silent past the heartbeat timeout, or not ready past
        the startup timeout (the caller holds the lock)."""
        a, now = self.config.async_config, time.time()
        if w.ready and now - w.last_seen > a.heartbeat_timeout_s:
            self._died(w, f"silent for {now - w.last_seen:.0f} s (heartbeat)")
        elif not w.ready and now - w.started > a.startup_timeout_s:
            self._died(w, f"not ready after {a.startup_timeout_s:.0f} s")

    def _handle(self, w: _Worker, msg) -> None:
        w.last_seen = time.time()
        kind = msg[0]
        if kind == "heartbeat":
            return
        if kind == "ready":
            _, w.pid, w.fingerprint, w.startup_s = msg
            w.ready = True
            self._check_fingerprint(w)
            return
        if kind == "result":
            _, step, attempt, trajs, info = msg
            self.sched.result(step, w.wid, attempt, info["start_version"], (trajs, info))
            return
        if kind == "error":
            self.failure = RolloutWorkerError(
                f"rollout worker {w.wid} (pid {w.proc.pid}) failed:\n{msg[1]}")
            self.workers.pop(w.wid, None)
            self.sched.worker_died(w.wid)
            self._reap(w)
            return
        self.failure = RolloutWorkerError(f"unknown message from worker {w.wid}: {kind!r}")

    def _check_fingerprint(self, w: _Worker) -> None:
        if self.fingerprint is not None and not np.isclose(w.fingerprint, self.fingerprint,
                                                           rtol=1e-6, atol=0.0):
            self.failure = RolloutWorkerError(
                f"rollout worker {w.wid} built a different base model (weight checksum "
                f"{w.fingerprint!r} vs the trainer's {self.fingerprint!r}): the base must be "
                "reproducible from the config (model.path or the seeded tiny model)")

    def _died(self, w: _Worker, why: str) -> None:
        if self.workers.pop(w.wid, None) is None:
            return
        try:
            code = w.proc.wait(1.0)
            why = f"{why}; exit code {code}" + (
                f" ({signal.Signals(-code).name})" if code < 0 else "")
        except (subprocess.TimeoutExpired, ValueError):
            pass
        lost = self.sched.worker_died(w.wid)
        self.deaths.append((w.wid, why, time.time()))
        self._reap(w)
        self.restarts += 1
        limit = self.config.async_config.max_restarts
        if self.restarts > limit:
            self.failure = RolloutWorkerError(
                f"rollout workers died {self.restarts} times (async_config.max_restarts="
                f"{limit}); last: worker {w.wid}, {why}")
            return
        self.log(f"rollout worker {w.wid} died ({why}); steps {lost} run again on a new worker")
        self._spawn()
        self._dispatch()

    def _reap(self, w: _Worker) -> None:
        """Kill the worker and every process that carries its token; remove its scratch."""
        if w.proc.poll() is None:
            try:
                w.proc.kill()
            except Exception:
                pass
        try:
            w.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        kill_tagged_processes(w.token)
        w.outbox.put(None)  # ends the sender thread (its blocked send fails on the dead pipe)
        for c in (w.cmd, w.out):
            try:
                c.close()
            except Exception:
                pass
        shutil.rmtree(w.scratch, ignore_errors=True)


def kill_tagged_processes(token: str) -> list[int]:
    """SIGKILL every process whose environment holds ``MTRL_ROLLOUT_WORKER=<token>`` (a dead
    worker's environment children: sandboxes, code runners). Linux ``/proc`` only."""
    needle = f"MTRL_ROLLOUT_WORKER={token}".encode()
    killed = []
    if not os.path.isdir("/proc"):
        return killed
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            try:
                os.kill(int(name), signal.SIGKILL)
                killed.append(int(name))
            except OSError:
                pass
    return killed


class InProcessRolloutPool:
    """The same schedule in the trainer's process, for debugging: a step's rollout is played
    when it becomes admissible (with the newest published weights), so each step trains on
    data exactly ``k`` versions old (fewer at the start)."""

    def __init__(self, config, runner):
        self.config = config
        self._runner = runner  # the RolloutRunner, or a function returning it
        self.runner = None
        self.tasks_for: Callable[[int], Sequence] | None = None
        self.sched: StalenessScheduler | None = None
        self.restarts = 0
        self.started = False

    def start(self, version: int, lora_state, *, tasks_for: Callable[[int], Sequence],
              first_step: int, last_step: int,
              base_fingerprint: Callable[[], float] | None = None) -> None:
        if self.started:
            return
        self.runner = self._runner() if callable(self._runner) else self._runner
        self.tasks_for = tasks_for
        self.sched = StalenessScheduler(self.config.async_config.max_steps_off_policy,
                                        first_step, last_step)
        self.sched.add_worker(0)
        self.started = True
        self.publish(version, lora_state)

    def publish(self, version: int, lora_state) -> None:
        self.sched.publish(version)
        self.runner.load_weights(lora_state, version)
        for a in self.sched.dispatch():
            t0 = time.perf_counter()
            trajs = self.runner.rollout_step(a.step, self.tasks_for(a.step))
            sv = start_version(trajs)
            info = {"start_version": sv if sv >= 0 else version, "dispatch_version": version,
                    "seconds": time.perf_counter() - t0,
                    "step_metrics": dict(self.runner.step_metrics)}
            self.sched.result(a.step, 0, a.attempt, info["start_version"], (trajs, info))

    def episodes(self, step: int) -> StepRollout:
        r = self.sched.take(step)
        if r is None:
            raise RuntimeError(f"in-process rollout for step {step} missing")
        trajs, info = r.payload
        info = dict(info)
        return StepRollout(trajs, {**info, "worker": 0, "attempt": r.attempt},
                           {**info.pop("step_metrics", {}), "async/wait_s": 0.0,
                            "async/worker_restarts": 0.0,
                            "async/ready_ahead": float(len(self.sched.done))},
                           float(info["seconds"]))

    def close(self) -> None:
        pass

    @property
    def pids(self) -> list[int]:
        return []
