"""Admission control for asynchronous rollouts: which step's rollout may start, on which worker,
and which results training may use.

The unit of work is one training step's rollout (``batch_size`` tasks x ``group_size``
episodes, one lockstep round of the sampler, the same round the synchronous trainer plays).
Policy version ``v`` is the LoRA policy after ``v`` optimizer steps, so training step ``s`` runs
with version ``s`` in the trainer. With ``k = max_steps_off_policy``:

* the rollout for step ``s`` may be *dispatched* once version ``s - k`` is published, and a
  worker starts it with the newest weights it holds (at least ``s - k``: weights and work travel
  down the same FIFO pipe, weights first);
* a result is *admitted* only if it comes from the worker and attempt it is assigned to (a
  result from a dead or superseded attempt is dropped: nothing is used twice) and if every
  episode started on version ``>= s - k`` (else the step is run again: the bound is never
  exceeded, whatever the timing);
* a worker's death puts every step it held back in the queue with ``attempt + 1`` (nothing is
  lost).

With ``k = 0`` this is the synchronous schedule. The class is pure bookkeeping (no processes,
no clocks), so its invariants are property-tested against random timings.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any


@dataclasses.dataclass(frozen=True)
class Assignment:
    step: int
    worker: int
    attempt: int


@dataclasses.dataclass
class Admitted:
    step: int
    payload: Any
    start_version: int  # the oldest version any of its episodes started on
    worker: int
    attempt: int


class StalenessScheduler:
    """Args:
      k: ``max_steps_off_policy``.
      first_step: the step training starts at (a resumed run's step).
      last_step: one past the final step (no rollout is dispatched beyond it).
    """

    def __init__(self, k: int, first_step: int, last_step: int):
        if k < 0:
            raise ValueError(f"max_steps_off_policy must be >= 0, got {k}")
        self.k = k
        self.last_step = last_step
        self.published = first_step        # newest policy version
        self.next_step = first_step        # next step not yet dispatched even once
        self.consumed = first_step         # steps below this were handed to training
        self.queue: deque[tuple[int, int]] = deque()  # (step, attempt) waiting for a worker
        self.assigned: dict[int, Assignment] = {}
        self.done: dict[int, Admitted] = {}
        self.workers: dict[int, int] = {}  # worker id -> steps held
        self.rejected = 0                  # results refused by the staleness check
        self.dropped = 0                   # results from dead or superseded attempts
        self.requeued = 0                  # steps run again after a worker died

    # ------------------------------------------------------------------ events

    def publish(self, version: int) -> None:
        if version < self.published:
            raise ValueError(f"version {version} published after {self.published}")
        self.published = version

    def add_worker(self, worker: int) -> None:
        self.workers.setdefault(worker, 0)

    def worker_died(self, worker: int) -> list[int]:
        """Forget ``worker``; its steps go back to the front of the queue. Returns them."""
        self.workers.pop(worker, None)
        lost = sorted(s for s, a in self.assigned.items() if a.worker == worker)
        for s in reversed(lost):
            a = self.assigned.pop(s)
            self.queue.appendleft((s, a.attempt + 1))
        self.requeued += len(lost)
        return lost

    def dispatch(self) -> list[Assignment]:
        """New assignments allowed now (admissible steps to the least-loaded live workers)."""
        while self.next_step < self.last_step and self.next_step - self.k <= self.published:
            self.queue.append((self.next_step, 0))
            self.next_step += 1
        out = []
        while self.queue and self.workers:
            step, attempt = self.queue.popleft()
            worker = min(self.workers, key=lambda w: (self.workers[w], w))
            a = Assignment(step, worker, attempt)
            self.assigned[step] = a
            self.workers[worker] += 1
            out.append(a)
        return out

    def result(self, step: int, worker: int, attempt: int, start_version: int,
               payload: Any) -> bool:
        """A worker finished ``step``; ``True`` when admitted. A result that fails the staleness
        check is requeued (see :meth:`dispatch`)."""
        a = self.assigned.get(step)
        if a is None or a.worker != worker or a.attempt != attempt:
            self.dropped += 1
            return False
        del self.assigned[step]
        if worker in self.workers:
            self.workers[worker] -= 1
        if start_version < step - self.k:
            self.rejected += 1
            self.queue.appendleft((step, attempt + 1))
            return False
        self.done[step] = Admitted(step, payload, start_version, worker, attempt)
        return True

    def take(self, step: int) -> Admitted | None:
        """The admitted result for the next training step, once it is there."""
        if step != self.consumed:
            raise ValueError(f"steps are consumed in order: expected {self.consumed}, got {step}")
        r = self.done.pop(step, None)
        if r is not None:
            self.consumed += 1
        return r

    # ------------------------------------------------------------------ views

    def held_by(self, worker: int) -> list[Assignment]:
        return sorted((a for a in self.assigned.values() if a.worker == worker),
                      key=lambda a: a.step)

    @property
    def in_flight(self) -> int:
        return len(self.assigned) + len(self.queue)
