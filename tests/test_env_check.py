"""``mtrl env-check`` on a SOP-Bench-format fixture: crashes and their causes, the sampled count,
and the comparison of a replayed tool with a reference implementation."""

import json

import pytest

from mtrl_jax.envs.sop import SopEnvironment
from mtrl_jax.rollout.env_check import env_check, format_report
from tests.test_sop_format import write_domain

TASK = "sop_bench:returns_desk"


@pytest.fixture
def desk(tmp_path, monkeypatch):
    write_domain(tmp_path / "root" / "returns_desk")
    monkeypatch.setenv("MTRL_SOP_BENCH_DIR", str(tmp_path / "root"))


def test_every_task_is_checked_by_default_and_the_report_is_json(desk):
    report = env_check(TASK)
    assert (report.n, report.total, report.sampled) == (3, 3, False)
    assert report.ok and report.oracle.strict_success == 1.0
    assert report.oracle.crashes == report.random.crashes == 0
    assert report.oracle.tool_calls == {"lookup_order": 3, "check_policy": 3,
                                        "get_courier_note": 3}
    text = format_report(report)
    assert "(test split, all 3 tasks; each policy run twice)" in text
    assert "oracle: strict success 1.000" in text and text.endswith("\nOK")
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["ok"] is True and as_json["oracle"]["crashes"] == 0


def test_a_smaller_n_says_how_many_of_how_many_it_sampled(desk):
    report = env_check(TASK, n=2, seed=1)
    assert (report.n, report.total, report.sampled) == (2, 3, True)
    assert "2 of 3 tasks, sampled with seed 1" in format_report(report)
    assert env_check(TASK, n=10).n == 3  # more than the split: all of it, not "sampled"


def test_crashed_episodes_are_counted_with_the_exception_and_an_example(desk, monkeypatch):
    real = SopEnvironment.reward

    def reward(self, episode):
        if episode.task.data["row"]["order_id"] == "ORD-2":
            raise RuntimeError("scorer broke on ORD-2")
        real(self, episode)

    monkeypatch.setattr(SopEnvironment, "reward", reward)
    report = env_check(TASK)
    assert not report.ok
    for policy in (report.oracle, report.random):
        assert policy.crashes == 1 and policy.finish_reasons["error"] == 1
        (crash,) = policy.crash_causes
        assert crash.error == "RuntimeError: scorer broke on ORD-2"
        assert crash.example_episode == "returns_desk/test/1" and crash.count == 1
        assert "in reward" in crash.traceback
    text = format_report(report)
    assert "1 of 3 episodes crashed" in text
    assert "1 x RuntimeError: scorer broke on ORD-2  (e.g. episode returns_desk/test/1)" in text
    assert text.endswith("\nFAILED")


REFERENCE = '''
ROWS = {"ORD-1": ("kettle", 25.5, 3, True), "ORD-2": ("lamp", 40.0, 45, False),
        "ORD-3": ("chair", 120.0, 10, False)}


class ReturnsDesk:
    """The desk's own code, as a benchmark would ship it."""

    def lookup_order(self, order_id):
        if not order_id:
            raise ValueError("Missing order_id")
        if order_id not in ROWS:
            raise ValueError(f"Order {order_id} not found")
        item, price, _, damaged = ROWS[order_id]
        return {"item": item, "price": price, "damaged": damaged}

    def check_policy(self, order_id, days_since_delivery):
        if not order_id or days_since_delivery is None:
            raise ValueError("Missing order_id or days_since_delivery")
        if order_id not in ROWS:
            raise ValueError(f"Order {order_id} not found")
        if days_since_delivery != ROWS[order_id][2]:
            raise ValueError(f"Wrong delivery age: {days_since_delivery}")
        return {"order_id": order_id, "return_window_days": 14}  # wrong on purpose: 30
'''


def test_a_reference_implementation_is_compared_call_by_call(desk, tmp_path):
    ref_file = tmp_path / "returns_desk_tools.py"
    ref_file.write_text(REFERENCE)
    report = env_check(TASK, reference=f"{ref_file}:ReturnsDesk")
    ref = report.reference
    lookup, policy = ref.tools["lookup_order"], ref.tools["check_policy"]
    # every lookup_order call, the random policy's junk included, answered identically
    assert lookup.calls > 3 and lookup.matches == lookup.calls
    # check_policy differs exactly on the oracle's three successful calls
    assert policy.calls - policy.matches == 3
    assert ref.not_in_reference == ["get_courier_note"]
    first = next(m for m in ref.mismatches if m.tool == "check_policy")
    assert first.replay == '{"order_id": "ORD-1", "return_window_days": 30}'
    assert first.reference == '{"order_id": "ORD-1", "return_window_days": 14}'
    assert first.arguments == {"order_id": "ORD-1", "days_since_delivery": 3}
    assert not report.ok and report.oracle.strict_success == 1.0
    text = format_report(report)
    assert f"reference {ref_file}:ReturnsDesk: {ref.matches} of {ref.calls} tool results" in text
    assert f"check_policy: {policy.matches}/{policy.calls}" in text
    assert json.loads(json.dumps(report.to_dict()))["reference"]["calls"] == ref.calls


def test_a_reference_that_names_nothing_real_fails_clearly(desk, tmp_path):
    ref_file = tmp_path / "ref.py"
    ref_file.write_text("class Desk:\n    pass\n")
    with pytest.raises(ValueError, match=r"has no 'ReturnsDesk'; it has \['Desk'\]"):
        env_check(TASK, n=1, reference=f"{ref_file}:ReturnsDesk")
