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


def row_shards(mesh: Mesh) -> int:
    """Into how many parts a batch's rows are split (the product of :data:`ROW_AXES`)."""
    return int(np.prod([mesh.shape[a] for a in ROW_AXES]))


class LocalPlacement:
    """One process, one device: host arrays become device arrays as they are."""

    row_multiple = 1

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
