"""Property tests of the staleness-bounded scheduler against random timings, worker speeds,
worker deaths and late messages from dead workers (a discrete-event simulation of the trainer
and its rollout workers, the same message order the real pipes give)."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrl_jax.rollout.scheduler import StalenessScheduler


class _SimWorker:
    def __init__(self, wid: int, speed: float, version: int):
        self.wid = wid
        self.speed = speed
        self.inbox: deque = deque([("weights", version)])
        self.version = -1
        self.current = None  # (assignment, start_version, finish_time)


def simulate(seed: int, k: int, n_workers: int, steps: int, kill_p: float, lie_p: float,
             train_time: float) -> dict:
    """Run a random schedule to the end; return what training consumed, in order."""
    rng = random.Random(seed)
    sched = StalenessScheduler(k, 0, steps)
    workers: dict[int, _SimWorker] = {}
    next_id = 0
    late: list[tuple] = []  # results a dead worker had in its pipe

    def spawn():
        nonlocal next_id
        w = _SimWorker(next_id, rng.uniform(0.2, 3.0), sched.published)
        workers[next_id] = w
        sched.add_worker(next_id)
        next_id += 1

    def send_work():
        for a in sched.dispatch():
            workers[a.worker].inbox.append(("work", a))

    for _ in range(n_workers):
        spawn()
    send_work()
    now, train_done_at = 0.0, None
    consumed: list = []
    for _ in range(100_000):
        if len(consumed) == steps:
            break
        now += rng.uniform(0.01, 0.5)
        # workers make progress
        for w in list(workers.values()):
            if w.current is None:
                while w.inbox and w.inbox[0][0] == "weights":
                    w.version = w.inbox.popleft()[1]
                if w.inbox:
                    a = w.inbox.popleft()[1]
                    w.current = (a, w.version, now + w.speed * rng.uniform(0.5, 2.0))
            elif now >= w.current[2]:
                a, v, _ = w.current
                w.current = None
                if rng.random() < lie_p:  # a buggy worker: claims an older start version
                    v = a.step - k - 1
                sched.result(a.step, w.wid, a.attempt, v, ("payload", a.step, a.attempt))
                send_work()
        # random deaths (SIGKILL): a finished result may still sit in the dead worker's pipe
        if workers and rng.random() < kill_p:
            wid = rng.choice(sorted(workers))
            w = workers.pop(wid)
            if w.current is not None and rng.random() < 0.5:
                a, v, _ = w.current
                late.append((a.step, wid, a.attempt, v, ("payload", a.step, a.attempt)))
            sched.worker_died(wid)
            spawn()
            send_work()
        if late and rng.random() < 0.3:
            assert not sched.result(*late.pop())  # dead attempts are never admitted
        # the trainer: consume the next step when its rollout is admitted, then publish
        if train_done_at is not None and now >= train_done_at:
            train_done_at = None
            sched.publish(len(consumed))
            for w in workers.values():
                w.inbox.append(("weights", sched.published))
            send_work()
        if train_done_at is None and len(consumed) < steps:
            r = sched.take(len(consumed))
            if r is not None:
                consumed.append(r)
                train_done_at = now + train_time * rng.uniform(0.5, 1.5)
    else:
        raise AssertionError("simulation did not finish")
    sched.publish(steps)
    return {"consumed": consumed, "sched": sched}


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(0, 3), n_workers=st.integers(1, 3),
       steps=st.integers(1, 12), kill_p=st.sampled_from([0.0, 0.02, 0.1]),
       lie_p=st.sampled_from([0.0, 0.1]), train_time=st.sampled_from([0.1, 1.0, 4.0]))
def test_staleness_bound_and_exactly_once(seed, k, n_workers, steps, kill_p, lie_p, train_time):
    out = simulate(seed, k, n_workers, steps, kill_p, lie_p, train_time)
    consumed, sched = out["consumed"], out["sched"]
    # every step trained exactly once, in order, on its own rollout
    assert [r.step for r in consumed] == list(range(steps))
    assert [r.payload[1] for r in consumed] == list(range(steps))
    for r in consumed:
        # the bound: trained at step s (policy version s) on data started at >= s - k
        assert r.start_version >= r.step - k
        assert r.step - r.start_version <= k
        # the admitted attempt is the one the scheduler assigned last
        assert r.payload[2] == r.attempt
    assert not sched.done and not sched.assigned and not sched.queue
    if lie_p == 0.0:
        assert sched.rejected == 0


def test_k0_is_the_synchronous_schedule():
    sched = StalenessScheduler(0, 0, 3)
    sched.add_worker(0)
    assert [a.step for a in sched.dispatch()] == [0]
    assert sched.dispatch() == []  # step 1 waits for version 1
    assert sched.result(0, 0, 0, start_version=0, payload="a")
    assert sched.take(0).payload == "a"
    sched.publish(1)
    assert [a.step for a in sched.dispatch()] == [1]


def test_k2_runs_ahead_two_steps_and_no_further():
    sched = StalenessScheduler(2, 0, 10)
    sched.add_worker(0)
    assert [a.step for a in sched.dispatch()] == [0, 1, 2]
    sched.publish(1)
    assert [a.step for a in sched.dispatch()] == [3]


def test_death_requeues_and_late_result_is_dropped():
    sched = StalenessScheduler(1, 0, 4)
    sched.add_worker(0)
    sched.add_worker(1)
    a0, a1 = sched.dispatch()
    assert {a0.worker, a1.worker} == {0, 1}  # least-loaded first
    lost = sched.worker_died(a0.worker)
    assert lost == [a0.step]
    sched.add_worker(2)
    (again,) = sched.dispatch()
    assert (again.step, again.worker, again.attempt) == (a0.step, 2, 1)
    assert not sched.result(a0.step, a0.worker, 0, 0, "late")  # the dead attempt
    assert sched.dropped == 1
    assert sched.result(again.step, 2, 1, 0, "ok")


def test_stale_result_is_rejected_and_rerun():
    sched = StalenessScheduler(1, 5, 10)
    sched.add_worker(0)
    steps = [a.step for a in sched.dispatch()]
    assert steps == [5, 6]
    assert not sched.result(6, 0, 0, start_version=4, payload="old")  # 6 - 1 > 4
    assert sched.rejected == 1
    (a,) = sched.dispatch()
    assert (a.step, a.attempt) == (6, 1)
    with pytest.raises(ValueError, match="in order"):
        sched.take(6)
