"""Asynchronous rollouts end to end: worker processes, staleness, faults, no orphans.

A tiny random byte-level model (tests/test_trainer.py's) on picklable environments
(tests/async_envs.py) so worker processes can rebuild them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mtrl_jax.rollout.worker import RolloutWorkerError
from mtrl_jax.training.trainer import MultiTurnRLTrainer
from tests.async_envs import (
    make_broken_setup_env,
    make_even_env,
    make_failing_env,
    make_resource_env,
    tasks,
)
from tests.test_trainer import TINY

_TIMING = ("time/", "throughput/", "async/wait_s", "async/worker_rollout_s", "async/ready_ahead")


def make(tmp_path, name, steps, extra=(), make_env=make_even_env):
    return MultiTurnRLTrainer(
        overrides=TINY + [f"steps={steps}", f"output_dir={tmp_path / name}", *extra],
        train_tasks=tasks("train", 6), val_tasks=tasks("val", 2), make_env=make_env,
        verbose=False, resume=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _tagged_pids(prefix: str) -> list[int]:
    """Processes whose environment carries a rollout-worker token starting with ``prefix``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"MTRL_ROLLOUT_WORKER={prefix}".encode()) for e in env) \
                and _alive(int(name)):
            out.append(int(name))
    return out


def _ledger(trainer):
    with open(os.path.join(trainer.config.output_dir, "rollout_ledger.jsonl")) as f:
        return [json.loads(line) for line in f]


def _expected_episodes(trainer, step):
    g = trainer.config.rollout.group_size
    return [f"s{step}/{t.id}#{j}" for t in trainer._tasks_for(step, (0, 0)) for j in range(g)]


def test_k0_worker_process_equals_synchronous_trainer(tmp_path):
    sync = make(tmp_path, "sync", 4)
    a = sync.train()
    sync.close()
    proc = make(tmp_path, "proc", 4, ["async_config.mode=process"])
    pool_pids, pools = [], []
    orig = proc._start_source

    def spy():
        orig()
        pool_pids.extend(proc.source.pids)
        pools.append(proc.source)

    proc._start_source = spy
    b = proc.train()
    proc.close()
    assert len(a) == len(b) == 4
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        keys = [k for k in x if not k.startswith(_TIMING)]
        assert len(keys) > 30
        for k in keys:
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (step, k, x[k], y[k])
        assert y["async/staleness/max"] == 0.0
        # the workers share a group's prompt in prefill, and the update packs it once per row
        assert y["rollout/prefill_saved_frac"] > 0.3 and y["train/shared_prefix_saving"] > 0.3
    assert pool_pids and not any(_alive(p) for p in pool_pids)  # stopped on a normal exit
    # only LoRA weights travel, once per version (0 at start, then after each step)
    import jax

    sent = pools[0].weights_sent
    assert [(w, v) for w, v, _ in sent] == [(0, v) for v in range(5)]
    lora_floats = sum(x.size for x in jax.tree.leaves(proc.lora))
    base_floats = sum(x.size for x in jax.tree.leaves(proc.base))
    assert all(n == lora_floats for _, _, n in sent) and lora_floats < base_floats
    assert [r["step"] for r in _ledger(proc)] == [0, 1, 2, 3]


def test_inprocess_mode_trains_exactly_k_stale_with_tis(tmp_path):
    t = make(tmp_path, "inproc", 4, ["async_config.mode=inprocess",
                                     "async_config.max_steps_off_policy=2"])
    hist = t.train()
    t.close()
    assert [m["async/staleness/max"] for m in hist] == [0.0, 1.0, 2.0, 2.0]
    assert hist[-1]["async/staleness/hist_2"] == 1.0
    # auto TIS: behaviour (sampler) vs trainer log-probs of stale data differ
    assert hist[0]["train/is_weight_max"] == pytest.approx(1.0, abs=1e-4)
    assert hist[-1]["train/is_weight_max"] > 1.0001
    assert "train/is_clip_frac" in hist[-1]


def test_sigkilled_worker_is_replaced_and_no_sample_is_lost_or_reused(tmp_path):
    steps, k = 6, 1
    t = make(tmp_path, "kill", steps, ["async_config.max_steps_off_policy=1",
                                       "async_config.partial_rollouts=true",
                                       "eval_interval=0", "checkpoint_interval=0"],
             make_env=make_resource_env)
    kills: list[int] = []
    kill_times: list[float] = []
    stop = threading.Event()
    rng = random.Random(0)

    def killer():
        while not stop.is_set() and len(kills) < 3:
            pool = t.source
            ready = [w for w in (pool.workers.values() if pool else []) if w.ready]
            if ready and ready[0].pid not in kills:
                time.sleep(rng.uniform(0.1, 0.6))  # somewhere inside a rollout (setup 0.4 s)
                try:
                    kill_times.append(time.time())
                    os.kill(ready[0].pid, signal.SIGKILL)
                    kills.append(ready[0].pid)
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
    assert len(kills) == 3
    deaths = pools[0].deaths
    assert len(deaths) == 3 and all("SIGKILL" in why for _, why, _ in deaths)
    for killed_at, (_, _, noticed_at) in zip(kill_times, deaths, strict=True):
        assert noticed_at - killed_at < 5.0  # noticed within seconds
    assert hist[-1]["async/worker_restarts"] >= 3
    assert hist[-1]["async/requeued_steps"] >= 1  # in-flight episodes ran again
    ledger = _ledger(t)
    assert [r["step"] for r in ledger] == list(range(steps))  # none lost, none twice
    for r in ledger:
        assert r["episodes"] == _expected_episodes(t, r["step"])
        assert r["step"] - r["start_version"] <= k
    assert max(r["attempt"] for r in ledger) >= 1
    # the killed workers' environment resources are gone: sleep children and temp folders
    assert _tagged_pids(f"{os.getpid()}-") == []
    scratch = os.path.join(t.config.output_dir, "rollout_workers")
    assert not os.path.exists(scratch) or os.listdir(scratch) == []


def test_worker_exception_reaches_trainer_with_traceback(tmp_path):
    t = make(tmp_path, "fail", 3, ["async_config.max_steps_off_policy=1", "eval_interval=0"],
             make_env=make_failing_env)
    with pytest.raises(RolloutWorkerError) as e:
        t.train()
    msg = str(e.value)
    assert "Traceback" in msg and "no fixture for task" in msg and "make_failing_env" in msg
    assert t.tracker.client.get_run(t.tracker.run_id).info.status == "FAILED"
    t.close()
    time.sleep(0.5)
    assert _tagged_pids(f"{os.getpid()}-") == []


def test_unimportable_make_env_is_refused_with_advice(tmp_path):
    with pytest.raises(ValueError, match="inprocess"):
        MultiTurnRLTrainer(overrides=TINY + ["steps=1", f"output_dir={tmp_path / 'x'}",
                                             "async_config.max_steps_off_policy=1"],
                           train_tasks=tasks("train", 2), make_env=lambda task: None,
                           verbose=False)


def test_a_failed_constructor_stops_the_workers_it_launched(tmp_path, monkeypatch):
    from mtrl_jax.rollout import worker
    from mtrl_jax.training import trainer as trainer_module

    launched = []
    orig = worker.ProcessRolloutPool.launch

    def launch(self):
        orig(self)
        launched.extend(w.proc.pid for w in self.workers.values())

    def broken_build(config):
        raise RuntimeError("the model could not be built")

    monkeypatch.setattr(worker.ProcessRolloutPool, "launch", launch)
    monkeypatch.setattr(trainer_module, "build_policy", broken_build)
    with pytest.raises(RuntimeError, match="could not be built"):
        make(tmp_path, "bad", 2, ["async_config.max_steps_off_policy=1"])
    assert launched and not any(_alive(p) for p in launched)
    assert _tagged_pids(f"{os.getpid()}-") == []


def test_no_worker_outlives_a_sigkilled_trainer(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_async import make
        from pathlib import Path
        t = make(Path({str(tmp_path)!r}), "orphan", 1000,
                 ["async_config.max_steps_off_policy=2", "eval_interval=0"])
        t.train()
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and not workers:
            workers = _tagged_pids(f"{trainer.pid}-")
            time.sleep(0.2)
        assert workers, "the trainer never started a worker"
        time.sleep(3.0)  # let it run
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        t0 = time.time()
        while time.time() - t0 < 10 and any(_alive(p) for p in workers):
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "a rollout worker outlived its trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_a_hung_worker_is_replaced_after_the_heartbeat_timeout(tmp_path):
    t = make(tmp_path, "hung", 3, ["async_config.max_steps_off_policy=1", "eval_interval=0",
                                   "checkpoint_interval=0", "async_config.heartbeat_s=0.5",
                                   "async_config.heartbeat_timeout_s=3"],
             make_env=make_resource_env)
    stopped: list[int] = []

    def freezer():
        while not stopped:
            pool = t.source
            ready = [w for w in (pool.workers.values() if pool else []) if w.ready]
            if ready:
                os.kill(ready[0].pid, signal.SIGSTOP)  # alive, but silent
                stopped.append(ready[0].pid)
            time.sleep(0.05)

    pools = []
    orig = t._start_source

    def spy():
        orig()
        pools.append(t.source)

    t._start_source = spy
    th = threading.Thread(target=freezer, daemon=True)
    th.start()
    hist = t.train()
    th.join()
    t.close()
    assert len(hist) == 3 and not _alive(stopped[0])
    assert any("heartbeat" in why for _, why, _ in pools[0].deaths)
    assert [r["step"] for r in _ledger(t)] == [0, 1, 2]


def test_steps_whose_episodes_all_fail_early_are_admitted_not_rerun_forever(tmp_path):
    """No sampled token, no version on the trajectories: the dispatch version counts."""
    t = make(tmp_path, "broken", 2, ["async_config.max_steps_off_policy=1", "eval_interval=0"],
             make_env=make_broken_setup_env)
    hist = t.train()
    t.close()
    assert len(hist) == 2 and all(m["rollout/error_frac"] == 1.0 for m in hist)
    assert hist[-1]["async/rejected_results"] == 0.0


def test_rollout_workers_import_the_recipes_user_families(tmp_path):
    """A task family registered by data.imports exists in the worker processes too (they are
    fresh interpreters: nothing the trainer imported is there unless they import it)."""
    family = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples",
                          "my_family.py")
    t = MultiTurnRLTrainer(
        overrides=TINY + ["steps=1", f"output_dir={tmp_path / 'user'}", "eval_interval=0",
                          f"data.imports=[{family}]", "data.task=warehouse:stock",
                          "async_config.mode=process", "rollout.max_turns=2",
                          "rollout.max_context_tokens=1024", "packing.row_lengths=[1024]"],
        verbose=False, resume=False)
    hist = t.train()
    t.close()
    assert len(hist) == 1 and hist[0]["rollout/error_frac"] == 0.0
    assert hist[0]["train/tokens"] > 0
    assert [r["worker"] for r in _ledger(t)] == [0]
    assert _ledger(t)[0]["episodes"][0].startswith("s0/warehouse/train/")
