"""The train step on several processes: JAX multi-controller (``jax.distributed``).

Every process runs the same program on its own devices; together their devices form one global
mesh (``(data, fsdp, tensor)``, :func:`~mtrl_jax.models.sharding.make_mesh`) over which the
model's parameters and LoRA weights are sharded by the rules of
:mod:`mtrl_jax.models.sharding`. A packed batch's rows are split over the ``data`` and ``fsdp``
axes: each process places only the rows its own devices hold (:class:`MeshPlacement`), and the
jitted step's collectives (gloo on CPU, NCCL on GPU, ICI on TPU) sum the gradients.

Starting the processes (:func:`initialize`):

- explicitly, by the environment variables that ``mtrl train --num-processes N`` sets for its
  local children (``MTRL_COORDINATOR`` ``host:port``, ``MTRL_NUM_PROCESSES``,
  ``MTRL_PROCESS_ID``), or the same set by hand on each host of a cluster;
- or by JAX's own cluster detection (SLURM, Open MPI, Kubernetes JobSet, TPU pods) when
  ``MTRL_NUM_PROCESSES`` is not set but ``MTRL_DISTRIBUTED=auto`` is.

On CPU the collectives use gloo (``jax_cpu_collectives_implementation``), set here before the
backend starts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ENV_COORDINATOR = "MTRL_COORDINATOR"
ENV_NUM_PROCESSES = "MTRL_NUM_PROCESSES"
ENV_PROCESS_ID = "MTRL_PROCESS_ID"
ENV_AUTO = "MTRL_DISTRIBUTED"
ROW_AXES = ("data", "fsdp")  # a batch's rows are split over these mesh axes


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    coordinator: str | None

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


def requested() -> bool:
    """Whether this process was started as one of several (by the environment)."""
    return int(os.environ.get(ENV_NUM_PROCESSES, "1")) > 1 or \
        os.environ.get(ENV_AUTO, "") == "auto"


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> ProcessInfo:
    """Join the job's processes (once per process, before any JAX computation).

    Arguments default to ``MTRL_COORDINATOR`` / ``MTRL_NUM_PROCESSES`` / ``MTRL_PROCESS_ID``;
    with none of them and ``MTRL_DISTRIBUTED=auto``, JAX detects the cluster itself. A single
    process (``num_processes`` 1) initialises nothing."""
    env = os.environ
    coordinator = coordinator or env.get(ENV_COORDINATOR)
    if num_processes is None and ENV_NUM_PROCESSES in env:
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in env:
        process_id = int(env[ENV_PROCESS_ID])
    auto = num_processes is None and env.get(ENV_AUTO, "") == "auto"
    if not auto and (num_processes or 1) == 1:
        return ProcessInfo(0, 1, None)
    if not auto:
        missing = [n for n, v in ((ENV_COORDINATOR, coordinator), (ENV_PROCESS_ID, process_id))
                   if v is None]
        if missing:
            raise ValueError(f"{num_processes} processes need {' and '.join(missing)} "
                             "(host:port of process 0, and this process's index)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} is not in [0, {num_processes})")
    # CPU devices' collectives across processes (the setting concerns the CPU backend only)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    return ProcessInfo(jax.process_index(), jax.process_count(), coordinator)


def multi_process() -> bool:
    """Whether this process is one of several in a ``jax.distributed`` job."""
    return jax.process_count() > 1


def row_shards(mesh: Mesh) -> int:
    """Into how many parts a batch's rows are split (the product of :data:`ROW_AXES`)."""
    return int(np.prod([mesh.shape[a] for a in ROW_AXES]))


class LocalPlacement:
    """One process, one device: host arrays become device arrays as they are."""

    row_multiple = 1
    mesh = None  # no mesh to make current during the step (MeshPlacement has one)

    def put(self, x: np.ndarray) -> jax.Array:
        return jax.numpy.asarray(x)

    def get(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x)


class MeshPlacement:
    """Rows of ``[rows, ...]`` host arrays over the mesh's ``data`` x ``fsdp`` devices.

    Every process holds the whole host batch (the same on each: they packed the same episodes)
    and copies to its own devices only the rows they hold, so the global array is assembled
    without any process sending rows to another. :meth:`get` brings a row-sharded result back
    whole to every process (an all-gather across processes)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.rows = NamedSharding(mesh, P(ROW_AXES))
        self.row_multiple = row_shards(mesh)

    def put(self, x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % self.row_multiple:
            raise ValueError(f"{x.shape[0]} rows do not split over {self.row_multiple} "
                             "row shards (pad the batch: Updater does)")
        return jax.make_array_from_callback(x.shape, self.rows, lambda index: x[index])

    def get(self, x: jax.Array) -> np.ndarray:
        return to_host(x)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array whole on every process, as numpy (an all-gather where other processes
    hold parts of it)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_tree(tree: Any) -> Any:
    """:func:`to_host` of every leaf (checkpoints, adapter exports, tests)."""
    return jax.tree.map(to_host, tree)


# ---------------------------------------------------------------------- the sharded update

CMD_STOP, CMD_LOAD, CMD_UPDATE, CMD_SAVE = 0, 1, 2, 3
_BATCH = ("tokens", "positions", "segment_ids", "parent_ids", "loss_mask", "advantages",
          "behaviour_logprobs")


def wants_sharding(config) -> bool:
    """Whether the train step runs on the mesh (``mesh.shard``; always with several
    processes)."""
    return jax.process_count() > 1 or config.mesh.shard == "always"


def _broadcast(tree: Any) -> Any:
    """Process 0's ``tree`` on every process (every process passes one of the same shapes)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def _broadcast_json(obj: Any = None) -> Any:
    """Process 0's JSON-able ``obj`` on every process (the others pass nothing)."""
    import json

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 \
        else np.zeros(0, np.uint8)
    n = int(_broadcast(np.asarray([data.size], np.int64))[0])
    if jax.process_index() != 0:
        data = np.zeros(n, np.uint8)
    return json.loads(np.asarray(_broadcast(data), np.uint8).tobytes().decode())


class ShardedUpdater:
    """The update step of :class:`~mtrl_jax.training.update.Updater` on the mesh of
    ``config.mesh`` (every process's devices), with the call signature of ``Updater``.

    Every process builds the same model (seeded) and holds its shards of the base weights,
    the LoRA weights and the optimizer state. Process 0 (the trainer: rollouts, evaluation,
    tracking, checkpoints) calls it like an ``Updater`` with host-side state; the others run
    :meth:`serve` and follow its commands: ``update`` (the packed batch, broadcast), ``load``
    (the trainer's LoRA and optimizer state, e.g. after a resume: broadcast and placed on the
    mesh), ``save`` (a checkpoint written collectively: each process its own shards), ``stop``.
    After each update the new LoRA weights and optimizer state are gathered
    whole to every process (collectively) and returned to the trainer as host arrays: they
    feed its sampler and its exports unchanged; a checkpoint (written collectively, read by
    process 0 alone) resumes with any process count.
    """

    def __init__(self, config, mesh: Mesh | None = None):
        from mtrl_jax.models.lora import split_lora
        from mtrl_jax.models.sharding import make_mesh, shard_model
        from mtrl_jax.rollout.runner import build_policy
        from mtrl_jax.training.update import Updater, make_optimizer

        m = config.mesh
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(m.data, m.fsdp, m.tensor)
        _, model = build_policy(config)
        shard_model(model, self.mesh)
        self.graphdef, self.lora, self.base = split_lora(model)
        self.tx, _ = make_optimizer(config)
        replicated = NamedSharding(self.mesh, P())

        def on_mesh(x):  # the optimizer's scalars (step counts) on every device of the mesh
            if isinstance(getattr(x, "sharding", None), NamedSharding):
                return x
            return jax.device_put(np.asarray(x), replicated)

        self.opt_state = jax.tree.map(on_mesh, self.tx.init(self.lora))
        self.placement = MeshPlacement(self.mesh)
        self.inner = Updater(self.graphdef, self.tx, config, placement=self.placement)
        self._returned: tuple[Any, Any] | None = None  # the host state last handed out
        self.stopped = False

    # -------------------------------------------------------------- process 0

    def __call__(self, lora, opt_state, base, batch):
        """``(lora, opt_state, metrics)`` as :class:`Updater` gives them (``base`` is unused:
        the mesh holds its own shards), as host arrays."""
        self._sync(lora, opt_state)
        self._command(CMD_UPDATE, batch.shape)
        metrics = self._update(self._share_batch(batch))
        self._returned = self._gather(lora, opt_state)
        return (*self._returned, metrics)

    def save_checkpoint(self, checkpoints, step: int, tree: Any, meta: dict[str, Any],
                        timeout_s: float = 300.0) -> str:
        """Checkpoint ``step`` of the trainer's state ``tree`` = ``(lora, opt_state)``, written
        by every process of the job at once (each its own shards of the mesh's copy).

        A peer that died cannot take part: after ``timeout_s`` this raises (the checkpoints
        already written stay; the launcher stops the job)."""
        import threading

        lora, opt_state = tree
        self._sync(lora, opt_state)
        checkpoints.delete_step(step)
        result: list = []

        def write():
            try:
                self._command(CMD_SAVE, (step, 0))
                _broadcast_json({"directory": checkpoints.directory,
                                 "max_to_keep": checkpoints.max_to_keep, "meta": meta})
                result.append(self._save(checkpoints, step, meta))
            except BaseException as e:
                result.append(e)

        t = threading.Thread(target=write, daemon=True, name="mtrl-collective-save")
        t.start()
        t.join(timeout_s)
        if not result:
            raise RuntimeError(f"the collective checkpoint write of step {step} did not finish "
                               f"within {timeout_s:.0f} s (a process of the job has died?)")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _save(self, checkpoints, step: int, meta: dict[str, Any]) -> str:
        """Every process: its shards of the mesh's state into ``checkpoints`` (collective)."""
        return checkpoints.save(step, (self.lora, self.opt_state), meta, collective=True)

    def _sync(self, lora, opt_state) -> None:
        """The mesh holds ``(lora, opt_state)`` (process 0: the state it hands in)."""
        if self._returned is None or lora is not self._returned[0] \
                or opt_state is not self._returned[1]:
            self._command(CMD_LOAD)
            self._load(lora, opt_state)
            self._returned = (lora, opt_state)

    def close(self, timeout_s: float = 20.0) -> None:
        """Release the other processes (they return from :meth:`serve`). A process that died
        cannot answer: after ``timeout_s`` this gives up waiting (its launcher stops the job)."""
        if not self.stopped and jax.process_count() > 1 and jax.process_index() == 0:
            import sys
            import threading

            def stop():
                try:
                    self._command(CMD_STOP)
                except Exception as e:  # a peer is gone: nothing left to release
                    print(f"[mtrl] could not stop the other processes: {type(e).__name__}",
                          file=sys.stderr, flush=True)

            t = threading.Thread(target=stop, daemon=True)
            t.start()
            t.join(timeout_s)
            if t.is_alive():
                print(f"[mtrl] the other processes did not take the stop within {timeout_s:.0f} "
                      "s (one has died?)", file=sys.stderr, flush=True)
        self.stopped = True

    # -------------------------------------------------------------- processes > 0

    def serve(self) -> int:
        """Follow process 0's commands until it stops; returns the number of updates."""
        updates = 0
        like_lora = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.lora)
        like_opt = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), self.opt_state)
        while True:
            cmd, rows, length = (int(v) for v in _broadcast(np.zeros(3, np.int32)))
            if cmd == CMD_STOP:
                self.stopped = True
                return updates
            if cmd == CMD_LOAD:
                self._load(like_lora, like_opt)
            elif cmd == CMD_UPDATE:
                self._update(self._share_batch(None, (rows, length)))
                self._gather(like_lora, like_opt)
                updates += 1
            elif cmd == CMD_SAVE:
                from mtrl_jax.training.checkpointing import Checkpoints

                what = _broadcast_json()
                self._save(Checkpoints(what["directory"], what["max_to_keep"]), rows,
                           what["meta"])
            else:
                raise RuntimeError(f"unknown command {cmd} from process 0")

    # -------------------------------------------------------------- collective parts

    def _command(self, cmd: int, shape: tuple[int, int] = (0, 0)) -> None:
        _broadcast(np.asarray([cmd, *shape], np.int32))

    def _load(self, lora, opt_state) -> None:
        """Process 0's host state, placed on the mesh like the current state."""
        host = _broadcast([np.asarray(x) for x in jax.tree.leaves((lora, opt_state))])
        current, treedef = jax.tree.flatten((self.lora, self.opt_state))
        if len(host) != len(current):
            raise ValueError(f"state of {len(host)} arrays for {len(current)} on the mesh")
        placed = [jax.device_put(np.asarray(h, dtype=c.dtype).reshape(c.shape), c.sharding)
                  for h, c in zip(host, current, strict=True)]
        self.lora, self.opt_state = jax.tree.unflatten(treedef, placed)

    def _share_batch(self, batch, shape: tuple[int, int] | None = None):
        from mtrl_jax.training.packing import PackedBatch

        if batch is not None:
            arrays = {k: np.asarray(getattr(batch, k)) for k in _BATCH}
            counts = np.asarray([batch.num_tokens, batch.flat_tokens], np.int64)
        else:
            ints = ("tokens", "positions", "segment_ids", "parent_ids")
            arrays = {k: np.zeros(shape, np.int32 if k in ints else np.float32) for k in _BATCH}
            counts = np.zeros(2, np.int64)
        arrays, counts = _broadcast((arrays, counts))
        if batch is not None:
            return batch
        return PackedBatch(arrays["tokens"], arrays["positions"], arrays["segment_ids"],
                           arrays["loss_mask"], arrays["behaviour_logprobs"],
                           arrays["advantages"], np.full(shape, -1, np.int32),
                           int(counts[0]), parent_ids=arrays["parent_ids"],
                           flat_tokens=int(counts[1]))

    def _update(self, batch) -> dict[str, float]:
        self.lora, self.opt_state, metrics = self.inner(self.lora, self.opt_state, self.base,
                                                        batch)
        return metrics

    def _gather(self, lora_like, opt_like) -> tuple[Any, Any]:
        """The mesh's LoRA and optimizer state whole, as host arrays in the structure of the
        trainer's (an all-gather: every process calls it)."""
        lora = jax.tree.unflatten(jax.tree.structure(lora_like),
                                  [to_host(x) for x in jax.tree.leaves(self.lora)])
        opt = jax.tree.unflatten(jax.tree.structure(opt_like),
                                 [to_host(x) for x in jax.tree.leaves(self.opt_state)])
        return lora, opt


def follow(config) -> int:
    """The life of a process other than 0: join process 0's train steps until it stops."""
    updater = ShardedUpdater(config)
    return updater.serve()


# ---------------------------------------------------------------------- the local launcher


def launch_local(cli_args: list[str], num_processes: int,
                 devices_per_process: int | None = None, *, poll_s: float = 0.5) -> int:
    """``mtrl <cli_args>`` (a ``train`` command line without the launch flags) as
    ``num_processes`` local processes joined by jax.distributed (a coordinator on a free
    127.0.0.1 port); returns process 0's exit code.

    Each child runs in its own session: the launcher forwards SIGINT / SIGTERM to process 0
    alone (the trainer saves a checkpoint and releases the others). If any process ends with an
    error, the others are stopped (SIGTERM, then SIGKILL after 30 s): a train step cannot go on
    without all of them. ``devices_per_process`` (CPU) sets XLA's host device count."""
    import signal
    import subprocess
    import sys
    import time

    from mtrl_jax.serving.launch import free_port

    if num_processes < 2:
        raise ValueError(f"launch_local needs >= 2 processes, got {num_processes}")
    coordinator = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    for i in range(num_processes):
        env = dict(os.environ, **{ENV_COORDINATOR: coordinator,
                                  ENV_NUM_PROCESSES: str(num_processes),
                                  ENV_PROCESS_ID: str(i)})
        if devices_per_process:
            flags = [f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(
                [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        procs.append(subprocess.Popen([sys.executable, "-m", "mtrl_jax.cli", *cli_args],
                                      env=env, start_new_session=True))
    print(f"[mtrl] {num_processes} processes (pids {[p.pid for p in procs]}), coordinator "
          f"{coordinator}", flush=True)

    def forward(signum, frame):
        if procs[0].poll() is None:
            procs[0].send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first_failed = None
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                first_failed = procs.index(failed[0])
                print(f"[mtrl] process {first_failed} exited with {failed[0].returncode}: "
                      "stopping the others (process 0 saves a checkpoint on SIGTERM)",
                      file=sys.stderr, flush=True)
                _stop_all(procs)
                break
            time.sleep(poll_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop_all(procs)
    code = procs[0].returncode
    if first_failed not in (None, 0):  # another process failed first: the job failed
        return 1
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def _stop_all(procs, grace_s: float = 30.0) -> None:
    import signal
    import subprocess
    import time

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
