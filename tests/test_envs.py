"""Task families, replayed SOP tools, scorers and env-check."""

import ast
import asyncio
import filecmp
import glob
import json
import os
import subprocess
import sys

import pytest

from mtrl_jax.cli import main as cli_main
from mtrl_jax.envs.base import ToolError
from mtrl_jax.envs.families import load_tasks, make_env
from mtrl_jax.envs.scoring import (
    dense_reward,
    extract_final_output,
    reward_audit,
    strict_score,
)
from mtrl_jax.envs.sop import load_sop_domain
from mtrl_jax.envs.sop_synth import generate_domain
from mtrl_jax.rollout.env_check import env_check
from mtrl_jax.rollout.parsing import ToolCall


@pytest.fixture(autouse=True)
def data_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTRL_DATA_DIR", str(tmp_path_factory.getbasetemp() / "mtrl_data"))


# ------------------------------------------------------------------------------ scoring


def test_strict_scorer_is_exact_after_case_and_whitespace_only():
    exp = {"status": "RESOLVED", "ready": "yes"}
    assert strict_score('<final_output>{"status": " resolved ", "ready": "YES"}</final_output>',
                        exp) == 1.0
    assert strict_score('<final_output>{"status": "resolv", "ready": "yes"}</final_output>',
                        exp) == 0.0  # no substring credit (SOP-Bench's comparator gives it)
    assert strict_score('<final_output>{"status": "RESOLVED"}</final_output>', exp) == 0.0
    # only the last block counts
    assert strict_score('<final_output>{"status": "RESOLVED", "ready": "yes"}</final_output> '
                        'no wait <final_output>{"status": "x", "ready": "no"}</final_output>',
                        exp) == 0.0
    assert strict_score("RESOLVED yes", exp) == 0.0
    assert strict_score('<final_output>{"n": 7}</final_output>', {"n": "7"}) == 1.0
    assert strict_score('<final_output>{"n": 7.0}</final_output>', {"n": "7"}) == 0.0
    assert extract_final_output("<final_output>[1]</final_output>") is None


def test_dense_reward_correctness_dominates_format():
    exp = {"a": "x", "b": "y"}
    r_all, m = dense_reward('<final_output>{"a": "x", "b": "y"}</final_output>', exp)
    r_half, _ = dense_reward('<final_output>{"a": "x", "b": "n"}</final_output>', exp)
    r_fmt, _ = dense_reward('<final_output>{"a": "n", "b": "n"}</final_output>', exp)
    r_none, _ = dense_reward("no answer", exp)
    assert r_all == pytest.approx(1.0) and m["strict"] == 1.0 and m["field/a"] == 1.0
    assert r_half == pytest.approx(0.55) and r_fmt == pytest.approx(0.1) and r_none == 0.0
    with pytest.raises(ValueError):
        dense_reward("x", exp, format_weight=0.6)


def test_reward_audit_flags_a_lenient_reward():
    exp = [{"s": "RESOLVED"}] * 3
    answers = ['<final_output>{"s": "resolved"}</final_output>',
               '<final_output>{"s": "e"}</final_output>', "RESOLVED"]

    def substring_reward(text, expected):  # SOP-Bench-style leniency
        ans = (extract_final_output(text) or {}).get("s", "")
        return float(bool(ans) and (ans.lower() in expected["s"].lower()
                                    or expected["s"].lower() in ans.lower()))

    report = reward_audit(answers, exp, substring_reward)
    assert report.lenient == [1] and report.harsh == [] and report.strict_successes == 1
    assert not report.reward_is_safe and report.agreement == pytest.approx(2 / 3)
    strict_report = reward_audit(answers, exp, lambda t, e: strict_score(t, e))
    assert strict_report.reward_is_safe and strict_report.agreement == 1.0


# ------------------------------------------------------------------------------ synthetic SOP


def test_synthetic_domain_is_seeded_and_splits_are_disjoint(tmp_path):
    sizes = {"train": 50, "val": 10, "test": 10}
    a = generate_domain("aircraft_inspection", tmp_path / "a", sizes=sizes, seed=3)
    b = generate_domain("aircraft_inspection", tmp_path / "b", sizes=sizes, seed=3)
    c = generate_domain("aircraft_inspection", tmp_path / "c", sizes=sizes, seed=4)
    for fn in os.listdir(a):
        assert filecmp.cmp(os.path.join(a, fn), os.path.join(b, fn), shallow=False), fn
    assert not filecmp.cmp(os.path.join(a, "train_set_with_outputs.csv"),
                           os.path.join(c, "train_set_with_outputs.csv"), shallow=False)
    dom = load_sop_domain(a, name="aircraft_inspection")
    assert dom.output_columns == ["mechanical", "electrical", "serial", "hydraulics",
                                  "maintenance", "ready"]
    ids = {s: {r["aircraft_id"] for r in rows} for s, rows in dom.rows.items()}
    assert len(ids["train"]) == 50 and not ids["train"] & ids["test"]
    # the answer is not a copy of any tool output: rules decide (borderline cases present)
    diffs = {int(r["component_weight_kg"]) - int(r["expected_weight_kg"])
             for r in dom.rows["train"]}
    assert {1, 2} <= {abs(d) for d in diffs}
    assert {r["ready"] for r in dom.rows["train"]} == {"yes", "no"}


def test_the_manual_domain_is_the_aircraft_checks_in_a_long_fixed_procedure(tmp_path):
    sizes = {"train": 20, "test": 5}
    short = load_sop_domain(generate_domain("aircraft_inspection", tmp_path / "s", sizes=sizes),
                            name="aircraft_inspection")
    long = load_sop_domain(generate_domain("aircraft_manual", tmp_path / "m", sizes=sizes),
                           name="aircraft_manual")
    # the same checks, word for word, inside a procedure ~10x longer (~2,100 SmolLM2 tokens)
    rules = short.sop[short.sop.index("1. mechanical"):]
    assert rules in long.sop and len(long.sop.split()) > 8 * len(short.sop.split())
    assert long.output_columns == short.output_columns
    assert long.toolspecs == short.toolspecs
    # one procedure for every task: the prompt that a group (and every group) shares
    again = load_sop_domain(generate_domain("aircraft_manual", tmp_path / "m2", sizes=sizes,
                                            seed=7), name="aircraft_manual")
    assert again.sop == long.sop
    assert {t.system for t in long.tasks("train")} == {long.tasks("train")[0].system}


def test_replayed_tools_answer_from_rows_and_report_errors(tmp_path):
    folder = generate_domain("loan_triage", tmp_path, sizes={"test": 5}, seed=1)
    dom = load_sop_domain(folder, name="loan_triage")
    task = dom.tasks("test")[0]
    row = task.data["row"]
    from mtrl_jax.envs.sop import SopEnvironment

    env = SopEnvironment(dom)

    async def go():
        await env.setup(task)
        ok = await env.call_tool(ToolCall("get_income", {"applicant_id": row["applicant_id"]}))
        with pytest.raises(ToolError, match="Applicant APP-0 not found"):
            await env.call_tool(ToolCall("get_income", {"applicant_id": "APP-0"}))
        with pytest.raises(ToolError,
                           match=r"get_debts\(\) missing 1 required positional argument"):
            await env.call_tool(ToolCall("get_debts", {}))
        return ok

    assert json.loads(asyncio.run(go())) == {"monthly_income": int(row["monthly_income"])}


@pytest.mark.parametrize("task", ["sop_synth:aircraft_inspection", "sop_synth:aircraft_manual",
                                  "sop_synth:loan_triage", "sop_synth:preflight",
                                  "math:arith", "sql:employees"])
def test_env_check_oracle_solves_and_random_fails(task):
    report = env_check(task, n=25, seed=0)
    assert report.deterministic, report.mismatches
    assert report.oracle.strict_success == 1.0
    assert report.random.strict_success <= 0.1
    assert report.oracle.tool_error_rate == 0.0 and sum(report.oracle.tool_calls.values()) > 0


def test_task_names_and_splits():
    train = load_tasks("math:arith", "train", n=5)
    test = load_tasks("math:arith", "test", n=5)
    assert {t.split for t in train} == {"train"} and train[0].prompt != test[0].prompt
    assert load_tasks("math:arith", "train", n=5)[0].prompt == train[0].prompt  # seeded
    with pytest.raises(ValueError, match="family:name"):
        load_tasks("arith")
    with pytest.raises(KeyError, match="Did you mean 'sop_synth'"):
        load_tasks("sop_synt:aircraft_inspection")
    with pytest.raises(KeyError, match="unknown task 'sql:orders'"):
        load_tasks("sql:orders")
    env = make_env(test[0])
    assert [t.name for t in env.tools()] == ["calculator"]


def test_cli_env_check(capsys):
    assert cli_main(["env-check", "math:arith", "--n", "10"]) == 0
    out = capsys.readouterr().out
    assert "oracle: strict success 1.000" in out and out.strip().endswith("OK")
    assert cli_main([]) == 0
    assert "env-check" in capsys.readouterr().out


def test_replay_environment_answers_from_jsonl_and_csv_fixtures(tmp_path):
    from mtrl_jax.envs.replay import ReplayEnvironment
    from mtrl_jax.envs.tools import tool_from_spec

    spec = tool_from_spec({"type": "function", "function": {
        "name": "price", "parameters": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["sku"]}}})
    jsonl = tmp_path / "fx.jsonl"
    jsonl.write_text(json.dumps({"tool": "price", "arguments": {"sku": "A", "qty": 2},
                                 "result": {"total": 10}}) + "\n")
    csv_path = tmp_path / "fx.csv"
    csv_path.write_text('tool,arguments,result\nprice,"{""qty"": 2, ""sku"": ""A""}",10\n')
    for fx in (str(jsonl), str(csv_path)):
        env = ReplayEnvironment([spec], fx)

        async def go(env=env):
            a = await env.call_tool(ToolCall("price", {"qty": 2, "sku": "A"}))  # any key order
            with pytest.raises(ToolError, match="no recorded result for price"):
                await env.call_tool(ToolCall("price", {"sku": "B"}))
            return a

        assert asyncio.run(go()) in ('{"total": 10}', "10")


def test_envs_import_nothing_from_rollout_or_training():
    """Layering: an environment is usable without the agent loop or the trainer. Every import
    statement in mtrl_jax/envs (function bodies included), and what importing it pulls in."""
    envs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtrl_jax",
                        "envs")
    forbidden = ("mtrl_jax.rollout", "mtrl_jax.training")
    direct = []
    for path in glob.glob(os.path.join(envs, "*.py")):
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                direct += [f"{os.path.basename(path)}: {n}" for n in names
                           if n.startswith(forbidden)]
    assert direct == []
    modules = [f"mtrl_jax.envs.{os.path.basename(p)[:-3]}"
               for p in glob.glob(os.path.join(envs, "*.py"))]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print([m for m in sys.modules if m.startswith({forbidden!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout
