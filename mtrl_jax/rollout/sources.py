"""Where a training step's episodes come from: one protocol, three schedules.

A :class:`RolloutSource` is started once with the first policy version and the schedule (which
tasks step ``s`` plays), hands the trainer the episodes of each step in order, receives every new
policy version's LoRA weights, and is closed on every exit path:

``start(version, lora, *, tasks_for, first_step, last_step, base_fingerprint)``
``episodes(step) -> StepRollout``
``publish(version, lora)``
``close()``

Implementations, chosen once from the recipe by :func:`make_rollout_source`:

- :class:`SyncRolloutSource` -- ``async_config.max_steps_off_policy = 0`` (mode ``auto``): step
  ``s`` is played in the trainer's process when asked, with version ``s`` (on-policy).
- :class:`~mtrl_jax.rollout.worker.InProcessRolloutPool` -- mode ``inprocess``: the asynchronous
  schedule in the trainer's process (debugging; every step exactly ``k`` versions stale).
- :class:`~mtrl_jax.rollout.worker.ProcessRolloutPool` -- mode ``process`` (and ``auto`` with
  ``k > 0``): rollout worker processes behind the staleness-bounded queue.

The trainer's ``lora`` is the one source of truth for the policy's weights: a source holds a
copy of the newest version it was given, never writes it back.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mtrl_jax.envs.base import Task
from mtrl_jax.rollout.trajectory import Trajectory


@dataclasses.dataclass
class StepRollout:
    """A step's episodes (task-major), where they came from (``worker``, ``attempt``,
    ``start_version``), the source's metrics (``async/...``) and the seconds spent sampling
    them (the worker's own time, not the trainer's wait)."""

    trajectories: list[Trajectory]
    info: dict[str, Any]
    metrics: dict[str, float]
    seconds: float


class RolloutSource(Protocol):
    def start(self, version: int, lora, *, tasks_for: Callable[[int], Sequence[Task]],
              first_step: int, last_step: int,
              base_fingerprint: Callable[[], float] | None = None) -> None:
        """Serve steps ``first_step .. last_step - 1`` (``tasks_for(step)``: the step's tasks)
        starting from policy ``version``. Sources whose workers rebuild the base model check
        it against the checksum ``base_fingerprint()`` returns (only they compute it)."""
        ...

    def episodes(self, step: int) -> StepRollout: ...

    def publish(self, version: int, lora) -> None: ...

    def close(self) -> None: ...


class SyncRolloutSource:
    """The synchronous schedule in the trainer's process (see the module docstring).
    ``runner``: the trainer's :class:`~mtrl_jax.rollout.runner.RolloutRunner`, or a function
    that returns it (called at :meth:`start`)."""

    def __init__(self, runner):
        self._runner = runner
        self.runner = None
        self.tasks_for: Callable[[int], Sequence[Task]] | None = None

    def start(self, version: int, lora, *, tasks_for: Callable[[int], Sequence[Task]],
              first_step: int, last_step: int,
              base_fingerprint: Callable[[], float] | None = None) -> None:
        self.runner = self._runner() if callable(self._runner) else self._runner
        self.tasks_for = tasks_for
        self.publish(version, lora)

    def episodes(self, step: int) -> StepRollout:
        if self.tasks_for is None:
            raise RuntimeError("SyncRolloutSource.episodes before start()")
        t0 = time.perf_counter()
        trajs = self.runner.rollout_step(step, self.tasks_for(step))
        metrics = dict(getattr(self.runner, "step_metrics", {}))
        return StepRollout(trajs, {"worker": -1, "attempt": 0,
                                   "start_version": self.runner.policy_version},
                           metrics, time.perf_counter() - t0)

    def publish(self, version: int, lora) -> None:
        self.runner.load_weights(lora, version)

    def close(self) -> None:
        pass


def rollout_mode(config) -> str:
    """``sync``, ``inprocess`` or ``process`` for a config's ``async_config``."""
    a = config.async_config
    if a.mode == "auto":
        return "process" if a.max_steps_off_policy > 0 else "sync"
    return a.mode


def make_rollout_source(config, runner, *, make_env: Callable | None) -> RolloutSource:
    """The recipe's source. ``runner``: the trainer's
    :class:`~mtrl_jax.rollout.runner.RolloutRunner` or a function returning it, called when the
    source starts (so a trainer can make its source first: a process pool's workers start
    booting now and build the base model while the trainer builds its own). ``make_env`` (None:
    the task family's) must be importable by name for worker processes."""
    mode = rollout_mode(config)
    if mode == "sync":
        return SyncRolloutSource(runner)
    from mtrl_jax.rollout.worker import InProcessRolloutPool, ProcessRolloutPool

    if mode == "inprocess":
        return InProcessRolloutPool(config, runner)
    cls = ProcessRolloutPool
    if config.async_config.backend == "ray":
        from mtrl_jax.rollout.ray_pool import RayRolloutPool as cls
    pool = cls(config, make_env=make_env,
               scratch_root=os.path.join(config.output_dir, "rollout_workers"))
    pool.launch()
    return pool
