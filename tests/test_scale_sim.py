"""benchmarks/scale_sim.py: the discrete-event simulation of the asynchronous schedule against
timelines derived by hand, the admission rule checked on its event trace, processor sharing,
the validation against benchmarks/results/async_rollouts.json, and the pod-scale arithmetic.
Pure Python, a few seconds."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "scale_sim", os.path.join(ROOT, "benchmarks", "scale_sim.py"))
sim = sys.modules["scale_sim"] = importlib.util.module_from_spec(_spec)  # dataclasses need it
_spec.loader.exec_module(sim)


def const(rollout_s: float, train_s: float) -> sim.Workload:
    """Every step: a rollout of ``rollout_s`` and a train step of ``train_s`` (no randomness)."""
    return sim.Workload(train_s=train_s, gen_s=rollout_s)


def tailed(**kw) -> sim.Workload:
    base = dict(train_s=1.0, episodes=16, turns=3, gen_s=0.4, gen_sigma=0.8, gen_cap_s=2.0,
                tool_s=0.2, tool_sigma=1.0, tool_cap_s=1.5, turn_fixed_s=0.05,
                rollout_fixed_s=0.1)
    return sim.Workload(**{**base, **kw})


# ---------------------------------------------------------------------- hand-derived timelines


@pytest.mark.parametrize("sync", [0.0, 0.5])
@pytest.mark.parametrize("workers", [1, 3])
def test_k0_is_rollout_then_train(sync, workers):
    # k = 0: step s may start only once version s exists (after train s - 1 and the sync)
    res = sim.simulate(const(3.0, 2.0), k=0, workers=workers, steps=5, weight_sync_s=sync)
    assert res.wall_s == pytest.approx(5 * (3.0 + 2.0 + sync), abs=1e-9)
    assert res.staleness == [0] * 5 and res.staleness_mean == 0.0
    assert res.s_per_step_after_first == pytest.approx(5.0 + sync)
    assert res.trainer_idle_frac == pytest.approx(1 - 10 / res.wall_s)


def test_k1_rollout_bound():
    # rollouts back to back (3 s each; rollout s needs version s - 1, published at 3s - 1);
    # train s in [3(s + 1), 3(s + 1) + 2]: wall 3N + 2; rollout s starts at 3s on version s - 1
    n = 7
    res = sim.simulate(const(3.0, 2.0), k=1, workers=1, steps=n)
    assert res.wall_s == pytest.approx(3 * n + 2)
    assert res.train_end == pytest.approx([3 * (s + 1) + 2 for s in range(n)])
    assert res.staleness == [0] + [1] * (n - 1)
    assert res.worker_idle_frac == pytest.approx(2 / (3 * n + 2))
    assert res.rollout_wait_s == pytest.approx(3 + (n - 1) * 1.0)


def test_k1_trainer_bound():
    # rollout 0 [0, 2], train s [2 + 3s, 5 + 3s]; rollout s + 1 waits for version s: wall 2 + 3N
    n = 6
    res = sim.simulate(const(2.0, 3.0), k=1, workers=1, steps=n)
    assert res.wall_s == pytest.approx(2 + 3 * n)
    assert res.staleness == [0] + [1] * (n - 1)
    assert res.trainer_idle_frac == pytest.approx(2 / (2 + 3 * n))


def test_k2_three_workers_cycle():
    # steps 0, 1, 2 go to workers 0, 1, 2 at t = 0 and end at 6; from then on a step's rollout
    # starts when version s - 2 is published: 3 steps per cycle of rollout + train = 8 s,
    # train ends 8, 10, 12, 16, 18, 20, 24, 26, 28
    res = sim.simulate(const(6.0, 2.0), k=2, workers=3, steps=9)
    assert res.train_end == pytest.approx([8, 10, 12, 16, 18, 20, 24, 26, 28])
    assert res.staleness == [0, 1, 2, 2, 2, 2, 2, 2, 2]


def test_enough_workers_make_it_trainer_bound():
    # 2 workers of 4 s per step keep up with a 2 s trainer at k = 4: after the first rollout the
    # trainer never waits: wall = 4 + 2N
    res = sim.simulate(const(4.0, 2.0), k=4, workers=2, steps=10)
    assert res.wall_s == pytest.approx(4 + 2 * 10)
    assert res.rollout_wait_s == pytest.approx(4.0)


def test_steady_period_meets_its_bounds():
    # the long-run period is never below max(train, rollout / W, (rollout + train + sync) /
    # (k + 1)); with one worker it is exactly that
    for r, t, k, s, w in itertools.product([0.5, 2, 5], [0.5, 2, 3], [0, 1, 2, 4], [0, 0.3],
                                           [1, 2, 3]):
        res = sim.simulate(const(r, t), k=k, workers=w, steps=90, weight_sync_s=s)
        period = (res.train_end[-1] - res.train_end[-61]) / 60
        bound = max(t, r / w, (r + t + s) / (k + 1))
        assert period >= bound * (1 - 1e-9), (r, t, k, s, w)
        if w == 1:
            assert period == pytest.approx(bound, rel=1e-9), (r, t, k, s)


def test_more_workers_never_slow_deterministic_steps():
    for r, t, k, s in itertools.product([0.5, 1, 3, 7], [0.5, 1, 3], [0, 1, 2, 4], [0, 0.3]):
        walls = [sim.simulate(const(r, t), k=k, workers=w, steps=25, weight_sync_s=s).wall_s
                 for w in range(1, 6)]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(walls)), (r, t, k, s, walls)


# ---------------------------------------------------------------------- admission and staleness


@pytest.mark.parametrize("k,workers", [(0, 1), (0, 2), (1, 1), (1, 3), (2, 2), (4, 3)])
def test_trace_obeys_admission(k, workers):
    sync, steps = 0.25, 40
    sharing = sim.Sharing(cores=2.0, train_demand=1.5, rollout_demand=1.0)
    res = sim.simulate(tailed(), k=k, workers=workers, steps=steps, weight_sync_s=sync,
                       worker_boot_s=0.7, sharing=sharing, seed=3, trace=True)
    published = {0: 0.0}  # version -> time the trainer published it
    for t, ev, _, _, v in res.trace:
        if ev == "train_end":
            published[v] = t
    assigned, rollout_start, rollout_end, train_start = {}, {}, {}, {}
    for t, ev, step, worker, v in res.trace:
        if ev == "dispatch":
            assert published[max(0, step - k)] <= t + 1e-9  # admissible when dispatched
            assigned[step] = worker
        elif ev == "rollout_start":
            assert step not in rollout_start  # every step generated once
            rollout_start[step] = t
            assert worker == assigned[step]  # runs where the scheduler put it
            assert v >= step - k  # the bound: never more than k versions old
            assert published[v] + sync <= t + 1e-9  # only weights that have arrived
            assert published[max(0, step - k)] + sync <= t + 1e-9
            assert t >= 0.7 - 1e-9  # the worker has booted
        elif ev == "rollout_end":
            rollout_end[step] = t
        elif ev == "train_start":
            train_start[step] = t
            assert t >= rollout_end[step] - 1e-9
    assert sorted(train_start) == list(range(steps))
    assert [train_start[s] for s in range(steps)] == sorted(train_start.values())  # in order
    assert max(res.staleness) <= k and res.staleness_max <= k
    if k == 0:
        assert res.staleness_mean == 0.0


# ---------------------------------------------------------------------- shared cores


def test_processor_sharing_slows_overlap():
    # k = 1, rollout 2 s, train 2 s. One core, each asks for one: overlapping work runs at half
    # speed (train s and rollout s + 1 both take 4 s), the last train step runs alone: wall 4N,
    # nothing gained over the serial schedule. Two cores: 2 + 2N.
    n = 8
    one = sim.simulate(const(2.0, 2.0), k=1, workers=1, steps=n,
                       sharing=sim.Sharing(1.0, 1.0, 1.0))
    two = sim.simulate(const(2.0, 2.0), k=1, workers=1, steps=n,
                       sharing=sim.Sharing(2.0, 1.0, 1.0))
    assert one.wall_s == pytest.approx(4 * n)
    assert two.wall_s == pytest.approx(2 + 2 * n)
    assert one.train_s == pytest.approx(4 * (n - 1) + 2)  # every train step but the last shared


def test_tool_waits_take_no_cpu():
    # a rollout that is all tool wait leaves the trainer its full speed on one core
    w = sim.Workload(train_s=2.0, turns=2, gen_s=0.0, tool_s=2.0)
    res = sim.simulate(w, k=1, workers=1, steps=6, sharing=sim.Sharing(1.0, 1.0, 1.0))
    assert res.train_s == pytest.approx(6 * 2.0)


# ---------------------------------------------------------------------- rollout draws


def test_slowest_episode_sets_the_step_and_caps_hold():
    w = tailed()
    rolls = sim.draw_rollouts(w, 50, seed=1)
    for phases in rolls:
        assert phases[0] == ("cpu", w.rollout_fixed_s)
        gens = [d for kind, d in phases[1:] if kind == "cpu"]
        waits = [d for kind, d in phases if kind == "wait"]
        assert len(gens) == w.turns and len(waits) == w.turns - 1
        assert max(gens) <= w.gen_cap_s + w.turn_fixed_s and max(waits) <= w.tool_cap_s
    many = sim.simulate(tailed(episodes=256), k=0, workers=1, steps=50, seed=1)
    few = sim.simulate(tailed(episodes=2), k=0, workers=1, steps=50, seed=1)
    assert many.rollout_s_mean > few.rollout_s_mean * 1.5  # the max of more draws: the tail


def test_deterministic_given_seed():
    kw = dict(k=2, workers=2, steps=30, weight_sync_s=0.1)
    a = sim.simulate(tailed(), seed=5, **kw)
    b = sim.simulate(tailed(), seed=5, **kw)
    c = sim.simulate(tailed(), seed=6, **kw)
    assert a.train_end == b.train_end and a.staleness == b.staleness
    assert a.train_end != c.train_end


# ---------------------------------------------------------------------- validation


def test_validation_table_against_measured_runs():
    data = sim.load_measured()
    v = sim.validate(data)
    rows = v["rows"]
    assert len(rows) == len(data["rows"])
    keys = {"latency_s", "k", "workers", "wall_measured", "wall_predicted", "wall_rel_err",
            "step_measured", "step_predicted", "step_rel_err", "staleness_predicted",
            "step_bracket", "in_bracket"}
    for r in rows:
        assert keys <= set(r)
        assert math.isfinite(r["wall_rel_err"]) and math.isfinite(r["step_rel_err"])
        assert r["wall_rel_err"] == pytest.approx(r["wall_predicted"] / r["wall_measured"] - 1)
        assert 0.0 <= r["staleness_predicted"] <= r["k"]
        lo, hi = r["step_bracket"]
        assert lo <= r["step_predicted"] * (1 + 1e-9) and r["step_predicted"] <= hi * (1 + 1e-9)
    fit = [r for r in rows if r["fit"]]
    assert {r["k"] for r in fit} == {0} and len(fit) == 2
    for r in fit:  # the calibration rows are reproduced
        assert abs(r["wall_rel_err"]) < 0.02 and abs(r["step_rel_err"]) < 0.02
    assert any(not r["fit"] for r in rows)
    json.dumps(v)


def test_calibration_never_reads_the_async_rows():
    data = sim.load_measured()
    mangled = copy.deepcopy(data)
    for r in mangled["rows"]:
        if r["k"] > 0:
            for key in ("wall_s", "s_per_step_after_first", "rollout_wait_s", "train_s"):
                r[key] *= 10
    assert sim.calibrate(mangled["rows"]) == sim.calibrate(data["rows"])
    a, b = sim.validate(data), sim.validate(mangled)
    assert [r["wall_predicted"] for r in a["rows"]] == [r["wall_predicted"] for r in b["rows"]]


# ---------------------------------------------------------------------- pod scale


def test_pod_arithmetic():
    sc = sim.SCENARIOS["gpu64"]
    w, sync_s, info = sim.pod_plan(sc, 1)
    tokens = 512 * (1500 + 2 * 250 + 1000)
    assert info["tokens_per_step"] == tokens
    assert w.train_s == pytest.approx(6 * 7.6e9 * tokens / (8 * 989e12 * 0.40))
    assert info["lora_params"] == 16 * 28 * (2 * (3584 + 3584) + 2 * (3584 + 512)
                                             + 3 * (3584 + 18944))
    assert info["episodes_per_engine"] == math.ceil(512 / 56)
    assert info["decode_memory_s"] > info["decode_compute_s"]  # decode is bandwidth-bound
    assert info["decode_step_s"] == pytest.approx(
        (7.6e9 * 2 + 10 * 2250 * 57344) / (4.8e12 * 0.70))
    assert sync_s == pytest.approx(info["lora_params"] * 2 / 50e9 + 0.5)
    assert info["fits_hbm"]
    v5e = sim.SCENARIOS["v5e256"]
    w5, _, i5 = sim.pod_plan(v5e, 2)
    assert w5.train_s == pytest.approx(6 * 7.6e9 * tokens / (64 * 197e12 * 0.40))
    assert i5["engines_per_worker"] == 24 and i5["fits_hbm"]


def test_scenario_grid():
    out = sim.run_scenario(sim.SCENARIOS["v5e256"], ks=[0, 1, 2], workers=[1, 2], steps=30,
                           seed=0)
    grid = {(g["k"], g["workers"]): g for g in out["grid"]}
    assert set(grid) == set(itertools.product([0, 1, 2], [1, 2]))
    for (k, w), g in grid.items():
        assert g["staleness_max"] <= k
        assert g["episodes_per_s"] == pytest.approx(512 * g["steps_per_s"])
        assert g["limit"] in {"trainer", "rollout workers", "k (admission cycle)"}
        assert g["steps_per_s"] >= grid[(0, w)]["steps_per_s"] * (1 - 1e-9)  # k > 0 helps
    assert grid[(0, 1)]["limit"] == "k (admission cycle)"  # serial
    json.dumps(out)


def test_cli(tmp_path, capsys):
    path = tmp_path / "sim.json"
    assert sim.main(["--validate", "--scenario", "gpu64", "--steps", "10", "--ks", "0", "1",
                     "--workers", "1", "--no-splits", "--out", str(path)]) == 0
    text = capsys.readouterr().out
    assert "held-out rows" in text and "PREDICTIONS" in text
    rec = json.loads(path.read_text())
    assert rec["validation"]["rows"] and rec["scenarios"]["gpu64"]["grid"]
