"""One run per output folder, fresh starts over an old run, and resume past a broken
checkpoint."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mtrl_jax.training import run_lock
from mtrl_jax.training.checkpointing import CheckpointError, Checkpoints
from mtrl_jax.training.run_lock import RunLockError
from tests.test_trainer import make

HOLD = """
import sys, time
from mtrl_jax.training import run_lock
run_lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                         text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another run: pid {p.pid} on host"):
            run_lock.acquire(str(tmp_path))
        # the trainer refuses before it builds anything
        with pytest.raises(RunLockError, match=f"pid {p.pid}"):
            make(tmp_path / "..", tmp_path.name, 1)
        assert not (tmp_path / "config.json").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    said = []
    run_lock.acquire(str(tmp_path), say=said.append)  # stale: its holder was SIGKILLed
    try:
        assert len(said) == 1 and f"pid {p.pid}" in said[0] and "no longer running" in said[0]
        info = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
        run_lock.acquire(str(tmp_path))  # re-entrant within one process
    finally:
        run_lock.release(str(tmp_path))
    assert (tmp_path / run_lock.LOCK_NAME).read_text() == ""  # released: nobody holds it
    said.clear()
    run_lock.acquire(str(tmp_path), say=said.append)
    run_lock.release(str(tmp_path))
    assert said == []  # a cleanly released lock is not "taken over"


def test_the_lock_is_held_while_the_trainer_lives(tmp_path):
    t = make(tmp_path, "run", 1)
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from mtrl_jax.training import run_lock; "
             "run_lock.acquire(sys.argv[1])", str(tmp_path / "run")],
            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode != 0 and f"pid {os.getpid()}" in out.stderr
    finally:
        t.close()
    p = _holder(tmp_path / "run")  # closed: another process may take the folder
    p.kill()
    p.wait()


def _fake_checkpoints(folder, steps=(2, 4)):
    ck = Checkpoints(str(folder / "checkpoints"))
    for s in steps:
        ck.save(s, {"w": np.full(3, float(s))}, {"step": s})
    (folder / "rollout_ledger.jsonl").write_text('{"step": 0}\n')


def test_a_fresh_start_over_another_run_refuses_archives_or_overwrites(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _fake_checkpoints(run)
    with pytest.raises(RunLockError, match=r"holds another run's checkpoints \(steps \[2, 4\]\)"
                                           r".*--archive-old.*--overwrite"):
        make(tmp_path, "run", 1, resume=False)
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]  # left alone
    run_lock.acquire(str(run))  # and the refusal released the lock
    run_lock.release(str(run))

    t = make(tmp_path, "run", 1, resume=False, on_existing="archive")
    t.close()
    assert t.step == 0
    (stamp,) = os.listdir(run / "archive")
    assert sorted(os.listdir(run / "archive" / stamp / "checkpoints")) == ["2", "4"]
    assert (run / "archive" / stamp / "rollout_ledger.jsonl").exists()
    assert not (run / "checkpoints").exists() and not (run / "rollout_ledger.jsonl").exists()

    _fake_checkpoints(run)
    t = make(tmp_path, "run", 1, resume=False, on_existing="overwrite")
    t.close()
    assert not (run / "checkpoints").exists() and len(os.listdir(run / "archive")) == 1


def test_resume_falls_back_past_incomplete_newer_checkpoints(tmp_path):
    ck = Checkpoints(str(tmp_path / "ck"))
    like = {"w": np.zeros(3)}
    for s in (1, 2):
        ck.save(s, {"w": np.full(3, float(s))}, {"step": s})
    os.makedirs(tmp_path / "ck" / "3")  # a write cut short: an empty folder
    os.makedirs(tmp_path / "ck" / "4" / "meta")  # or a partial one
    said = []
    meta, tree = Checkpoints(str(tmp_path / "ck")).restore_latest(like, say=said.append)
    assert meta["step"] == 2 and float(tree["w"][0]) == 2.0
    assert [m.split()[2] for m in said] == ["4", "3"]
    assert sorted(x.split("-")[0] for x in os.listdir(tmp_path / "ck_unusable")) == ["3", "4"]
    assert Checkpoints(str(tmp_path / "ck")).steps() == [1, 2]
    # every checkpoint broken: an error naming each, never a silent fresh start
    os.makedirs(tmp_path / "bad" / "5")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*step 5"):
        Checkpoints(str(tmp_path / "bad")).restore_latest(like)
    assert Checkpoints(str(tmp_path / "empty")).restore_latest(like) is None
