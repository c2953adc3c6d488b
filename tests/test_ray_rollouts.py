"""Rollout workers as Ray actors (``async_config.backend: ray``): the process pool's semantics
on a local Ray cluster the run starts and stops -- the synchronous schedule reproduced metric
for metric, LoRA-only weights through the object store, a SIGKILLed actor replaced with
nothing lost or reused, no actor or raylet left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("ray")

from tests.async_envs import make_resource_env
from tests.test_async import (
    _TIMING,
    _alive,
    _expected_episodes,
    _ledger,
    _tagged_pids,
    make,
)

RAY = ["async_config.backend=ray"]


def _descendants(root: int) -> list[int]:
    """Live processes under ``root`` (this test's Ray cluster: GCS, raylet, workers, actors;
    not another xdist worker's)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if _alive(c):
                out.append(c)
                todo.append(c)
    return out


def test_ray_actors_reproduce_the_synchronous_trainer_and_leave_nothing(tmp_path):
    import ray

    sync = make(tmp_path, "sync", 3)
    a = sync.train()
    sync.close()
    t = make(tmp_path, "ray", 3, ["async_config.mode=process", *RAY])
    pools, actor_pids, cluster = [], [], []
    orig = t._start_source

    def spy():
        orig()
        pools.append(t.source)
        assert ray.is_initialized()
        # ray.init's own SIGTERM handler (exit at once) did not displace the trainer's
        assert signal.getsignal(signal.SIGTERM) == t._signals._handle
        deadline = time.time() + 120
        while not t.source.pids and time.time() < deadline:
            time.sleep(0.1)
        actor_pids.extend(t.source.pids)
        cluster.extend(_descendants(os.getpid()))

    t._start_source = spy
    b = t.train()
    t.close()
    assert actor_pids and os.getpid() not in actor_pids  # actors ran in their own processes
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        keys = [k for k in x if not k.startswith(_TIMING)]
        assert len(keys) > 30
        for k in keys:
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (step, k, x[k], y[k])
    sent = pools[0].weights_sent
    assert [(w, v) for w, v, _ in sent] == [(0, v) for v in range(4)]
    assert [r["step"] for r in _ledger(t)] == [0, 1, 2]
    # the run started the local cluster, so it stopped it: no actor, raylet or GCS is left
    assert not ray.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert set(actor_pids) <= set(cluster) and len(cluster) > len(actor_pids)  # + raylet, GCS
    deadline = time.time() + 20
    while any(_alive(p) for p in cluster) and time.time() < deadline:
        time.sleep(0.5)
    assert [p for p in cluster if _alive(p)] == []


def test_a_sigkilled_actor_is_replaced_and_no_sample_is_lost_or_reused(tmp_path):
    steps, k = 5, 1
    t = make(tmp_path, "kill", steps, ["async_config.max_steps_off_policy=1",
                                       "eval_interval=0", "checkpoint_interval=0", *RAY],
             make_env=make_resource_env)
    kills: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and len(kills) < 2:
            pool = t.source
            ready = [w for w in (list(pool.workers.values()) if pool else [])
                     if w.ready and w.proc.pid]
            if ready and ready[0].proc.pid not in kills:
                time.sleep(0.3)  # inside a rollout (the environment's setup takes 0.4 s)
                try:
                    os.kill(ready[0].proc.pid, signal.SIGKILL)
                    kills.append(ready[0].proc.pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    pools = []
    orig = t._start_source

    def spy():
        orig()
        pools.append(t.source)

    t._start_source = spy
    hist = t.train()
    stop.set()
    th.join()
    t.close()
    assert len(kills) == 2
    assert len(pools[0].deaths) == 2 and all("actor died" in why for _, why, _ in pools[0].deaths)
    assert hist[-1]["async/worker_restarts"] >= 2
    ledger = _ledger(t)
    assert [r["step"] for r in ledger] == list(range(steps))  # none lost, none twice
    for r in ledger:
        assert r["episodes"] == _expected_episodes(t, r["step"])
        assert r["step"] - r["start_version"] <= k
    assert _tagged_pids(f"{os.getpid()}-") == []  # the dead actors' sleep children are gone


def test_an_error_in_an_actor_reaches_the_trainer_with_its_traceback(tmp_path):
    from mtrl_jax.rollout.worker import RolloutWorkerError
    from tests.async_envs import make_failing_env

    t = make(tmp_path, "err", 2, ["async_config.mode=process", "eval_interval=0", *RAY],
             make_env=make_failing_env)
    with pytest.raises(RolloutWorkerError, match="Traceback"):
        t.train()
    t.close()



@pytest.mark.slow  # builds (or reuses) the demo's warm-up base (~6 min): a policy that calls tools
@pytest.mark.parametrize("backend", ["process", "ray"])
def test_partial_rollouts_load_newer_weights_between_turns(tmp_path, backend):
    """``async_config.partial_rollouts``: a worker (process or actor) loads weights published
    while its episodes run, so later turns of an episode carry a newer policy version; the
    versions only grow along an episode and stay within k of the step that trains on them."""
    from mtrl_jax.demo import DEMO_RECIPE, warmup
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    steps, k = 4, 1
    t = MultiTurnRLTrainer(DEMO_RECIPE, overrides=[
        f"model.path={warmup(verbose=False)}", f"output_dir={tmp_path / backend}",
        f"steps={steps}", "eval_interval=0", "checkpoint_interval=0", "rollout.batch_size=4",
        "rollout.simulated_tool_latency_s=0.3", f"async_config.max_steps_off_policy={k}",
        "async_config.partial_rollouts=true", f"async_config.backend={backend}"],
        verbose=False, resume=False)
    seen: list[tuple[int, list[list[int]]]] = []
    orig = t._staleness_metrics

    def spy(trajs, step):
        seen.append((step, [[v for s in tr.samples
                             for v, m in zip(s.policy_version, s.loss_mask, strict=True) if m]
                            for tr in trajs]))
        return orig(trajs, step)

    t._staleness_metrics = spy
    t.train()
    t.close()
    assert [s for s, _ in seen] == list(range(steps))
    mixed = 0
    for step, episodes in seen:
        for versions in episodes:
            assert versions == sorted(versions)  # a newer version only in later turns
            assert step - k <= versions[0] and versions[-1] <= step
            mixed += len(set(versions)) > 1
    assert mixed > 0  # weights arrived mid-episode and the later turns used them
    assert [r["step"] for r in _ledger(t)] == list(range(steps))
