"""Rollout workers as Ray actors (``async_config.backend: ray``).

The same workers and schedule as :class:`~mtrl_jax.rollout.worker.ProcessRolloutPool` -- the
same :func:`~mtrl_jax.rollout.worker.worker_main` loop, the same messages, the same
:class:`~mtrl_jax.rollout.scheduler.StalenessScheduler` admission, restarts and ledger -- on
Ray's processes instead of local pipes:

- each worker is a Ray actor (:class:`RolloutActor`) that runs ``worker_main`` in a thread;
  the trainer puts messages into it (``put``) and long-polls what it says (``drain``), so the
  pool's monitor learns of results, heartbeats and errors within its polling interval;
- LoRA weights go into Ray's object store once per version (``ray.put``) and every actor
  fetches that one copy;
- a dead actor (its process killed, its node lost) fails its pending ``drain`` with
  ``RayActorError``: the pool replaces it and its steps run again, exactly as for a dead
  process; a silent one is replaced after ``heartbeat_timeout_s``;
- the cluster is the one ``async_config.ray_address`` (or ``RAY_ADDRESS``) names, or a local
  one the pool starts and stops itself (``ray.shutdown()`` at close: no raylet outlives the
  run); actors ask for ``ray_num_cpus`` CPUs and ``ray_num_gpus`` GPUs each (one worker per
  GPU on an accelerator cluster).

Environment children of a worker (sandboxes, code runners) carry the worker's token in their
environment, as with processes; on this machine a dead actor's are found and killed through
``/proc`` (on another node they end with the actor's process group).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from mtrl_jax.rollout.worker import ProcessRolloutPool, WorkerSpec, _Worker


class _Pipe:
    """One direction of a worker's protocol inside an actor (``send``/``recv`` of a queue)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def send(self, msg) -> None:
        self.q.put(msg)

    def recv(self):
        return self.q.get()

    def close(self) -> None:
        pass


class RolloutActor:
    """The body of a rollout worker actor (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self):
        self.cmd, self.out = _Pipe(), _Pipe()
        self.thread: threading.Thread | None = None

    def start(self, sys_path: list[str], spec: WorkerSpec) -> int:
        from mtrl_jax.rollout.worker import worker_main

        for p in sys_path:
            if p not in sys.path:
                sys.path.append(p)
        self.thread = threading.Thread(target=worker_main, args=(spec, self.cmd, self.out),
                                       daemon=True, name="mtrl-ray-worker")
        self.thread.start()
        return os.getpid()

    def put(self, msg) -> None:
        if msg[0] == "weights" and not isinstance(msg[2], dict):
            import ray

            msg = (msg[0], msg[1], ray.get(msg[2]))  # one object-store copy per version
        self.cmd.send(msg)

    def drain(self, timeout_s: float) -> list:
        """What the worker said since the last call (waits up to ``timeout_s`` for one)."""
        out = []
        try:
            out.append(self.out.q.get(timeout=timeout_s))
            while True:
                out.append(self.out.q.get_nowait())
        except queue.Empty:
            pass
        return out


class _ActorProc:
    """The little of ``subprocess.Popen`` the pool uses, for an actor."""

    def __init__(self, handle):
        self.handle = handle
        self.pid: int | None = None
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("ray actor", timeout or 0.0)
        return self.returncode

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:
            pass
        if self.returncode is None:
            self.returncode = -9


class RayRolloutPool(ProcessRolloutPool):
    """:class:`~mtrl_jax.rollout.worker.ProcessRolloutPool` with Ray actors for processes."""

    poll_s = 0.2

    def __init__(self, config, **kw):
        import ray

        a = config.async_config
        address = a.ray_address or os.environ.get("RAY_ADDRESS")
        self._owns_ray = False
        if not ray.is_initialized():
            # ray.init replaces the SIGTERM handler with one that exits and never puts it back:
            # the trainer's own (checkpoint, then stop) must stay in force
            main = threading.current_thread() is threading.main_thread()
            old_term = signal.getsignal(signal.SIGTERM) if main else None
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # Ray runs its workers at niceness 15 by default; rollout actors that share the
                # machine with the trainer would then get the CPU only when it is idle (the
                # process pool's workers run at the trainer's priority)
                ray.init(num_cpus=max(os.cpu_count() or 1, int(a.ray_num_cpus * a.num_workers)),
                         include_dashboard=False, log_to_driver=False,
                         _system_config={"worker_niceness": 0})
                self._owns_ray = True
            if main and old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        self._actor_cls = ray.remote(RolloutActor)
        self._weight_refs: dict[int, Any] = {}
        self._drains: dict[int, Any] = {}  # worker id -> its pending drain call
        try:
            super().__init__(config, **kw)
        except BaseException:
            if self._owns_ray:  # e.g. an unpicklable make_env: no cluster left running
                ray.shutdown()
            raise

    # ------------------------------------------------------------------ transport

    def _spawn(self) -> _Worker:
        import uuid

        a = self.config.async_config
        wid = self._next_id
        self._next_id += 1
        token = f"{os.getpid()}-{wid}-{uuid.uuid4().hex[:8]}"
        scratch = os.path.join(self.scratch_root, f"worker{wid}-{token}")
        spec = WorkerSpec(wid, self.config, self.make_env, scratch, token, parent_pid=-1,
                          heartbeat_s=a.heartbeat_s, exit_on_error=False)
        env = {"MTRL_ROLLOUT_WORKER": token,
               "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                           self.compile_cache),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
                   os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")}
        for k in ("JAX_PLATFORMS", "XLA_FLAGS", "MTRL_DATA_DIR", "PYTHONPATH"):
            if k in os.environ:
                env[k] = os.environ[k]
        handle = self._actor_cls.options(
            num_cpus=a.ray_num_cpus, num_gpus=a.ray_num_gpus, max_concurrency=4,
            runtime_env={"env_vars": env}).remote()
        now = time.time()
        w = _Worker(wid, _ActorProc(handle), cmd=handle, out=None, scratch=scratch,
                    token=token, started=now, last_seen=now)
        threading.Thread(target=self._sender, args=(w,), daemon=True,
                         name=f"mtrl-ray-sender-{wid}").start()
        self.workers[wid] = w
        self.sched.add_worker(wid)
        self._send(w, ("start", [p for p in sys.path if p], spec))
        if self._weights is not None:
            self._send_weights(w)
        return w

    def _send_weights(self, w: _Worker) -> None:
        import jax
        import ray

        version, lora = self._weights
        if version not in self._weight_refs:
            self._weight_refs = {version: ray.put(lora)}  # the newest only: older are freed
        self._send(w, ("weights", version, self._weight_refs[version]))
        self.weights_sent.append((w.wid, version, sum(x.size for x in jax.tree.leaves(lora))))

    @staticmethod
    def _sender(w: _Worker) -> None:
        import ray

        while True:
            msg = w.outbox.get()
            if msg is None:
                return
            try:
                if msg[0] == "start":
                    w.proc.pid = ray.get(w.cmd.start.remote(msg[1], msg[2]))
                else:
                    ray.get(w.cmd.put.remote(msg))
            except Exception:
                return  # the actor is gone; the monitor notices on its drain

    def _run_monitor(self) -> None:
        import ray

        while True:
            with self._lock:
                if self._closed:
                    return
                for wid, w in self.workers.items():
                    if wid not in self._drains:
                        self._drains[wid] = w.cmd.drain.remote(self.poll_s)
                refs = {ref: wid for wid, ref in self._drains.items()}
            ready = []
            if refs:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.poll_s)
            else:
                time.sleep(self.poll_s)
            with self._cond:
                if self._closed:
                    return
                for ref in ready:
                    wid = refs[ref]
                    self._drains.pop(wid, None)
                    w = self.workers.get(wid)
                    if w is None:
                        continue
                    try:
                        msgs = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        w.proc.returncode = -9
                        self._died(w, f"actor died ({type(e).__name__})")
                        continue
                    except Exception as e:
                        from mtrl_jax.rollout.worker import RolloutWorkerError

                        self.failure = RolloutWorkerError(f"rollout actor {wid}: {e}")
                        continue
                    for msg in msgs:
                        self._handle(w, msg)
                for w in list(self.workers.values()):
                    self._check_timeouts(w)
                self._cond.notify_all()

    def _reap(self, w: _Worker) -> None:
        import shutil

        from mtrl_jax.rollout.worker import kill_tagged_processes

        self._drains.pop(w.wid, None)
        w.proc.kill()
        kill_tagged_processes(w.token)
        w.outbox.put(None)
        shutil.rmtree(w.scratch, ignore_errors=True)

    def close(self) -> None:
        """Kill every actor (their environment children with them) and, when the pool
        started the local cluster, shut it down."""
        super().close()
        if self._owns_ray:
            import ray

            self._owns_ray = False
            ray.shutdown()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self.workers.values() if w.proc.pid is not None]
