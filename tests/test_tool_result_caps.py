"""Tool results are capped before the model reads them (bytes first, then tokens), at the
source for SQLite, and a 40 MB result never reaches the tokenizer or memory whole."""

import asyncio
import json
import sqlite3
import time
import tracemalloc
from types import SimpleNamespace

import pytest

from mtrl_jax.envs.base import Environment, FunctionEnvironment, Task, ToolError
from mtrl_jax.envs.families import SQLEnvironment, format_sql_result
from mtrl_jax.envs.replay import ReplayEnvironment
from mtrl_jax.envs.tools import tool, tool_from_spec
from mtrl_jax.envs.verifiable import SQLiteSandbox
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import (
    AgentLoop,
    AgentLoopConfig,
    cap_tool_text,
    utf8_prefix,
    utf8_size,
)
from mtrl_jax.rollout.sampler import ScriptedSampler

TOK = build_byte_tokenizer()
IM_END = TOK.convert_tokens_to_ids("<|im_end|>")
MB40 = 40 << 20
BIG = "0123456789abcdef" * (MB40 // 16)  # 40 MiB, built once


class RecordingTokenizer:
    """The byte tokenizer, remembering the longest text it was asked to tokenise or render."""

    def __init__(self, tok):
        self._tok = tok
        self.longest_encode = 0
        self.longest_render = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, **kw):
        self.longest_encode = max(self.longest_encode, len(text))
        return self._tok.encode(text, **kw)

    def apply_chat_template(self, *args, **kw):
        out = self._tok.apply_chat_template(*args, **kw)
        self.longest_render = max(self.longest_render, len(out))
        return out


def call(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


TASK = Task(id="t0", family="test", name="caps", prompt="Go.", system="Use tools.")


def cfg(**kw):
    """Room for long scripted turns; the caps (and anything else) from ``kw``."""
    return AgentLoopConfig(**{"sampling_max_tokens": 1 << 14, "max_context_tokens": 1 << 16,
                              **kw})


def run(env, script, config=None, tokenizer=TOK, task=TASK):
    sampler = ScriptedSampler(TOK, lambda eid, turn, toks: script[turn], IM_END)
    loop = AgentLoop(tokenizer, sampler, config or cfg())
    return asyncio.run(loop.run(env, task, episode_id="e0")), sampler


def tool_messages(traj):
    return [m["content"] for m in traj.messages if m["role"] == "tool"]


@tool
def dump() -> str:
    """Return 40 MiB of text."""
    return BIG


@tool
def echo(text: str) -> str:
    """Return the text.

    Args:
      text: what to return.
    """
    return text


@tool
def explode() -> str:
    """Fail with a huge message."""
    raise RuntimeError("e" * (4 << 20))


def env_of(*tools):
    return FunctionEnvironment(list(tools), lambda ep: ep.update_reward(0.0))


# ------------------------------------------------------------------------------ the agent loop


def test_a_40mb_result_is_cut_by_bytes_before_it_is_tokenised():
    cap = 16384
    config = cfg(max_tool_result_bytes=cap, max_tool_result_tokens=1 << 20)
    tok = RecordingTokenizer(TOK)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        traj, sampler = run(env_of(dump), [call("dump"), "done"], config, tokenizer=tok)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert traj.finish_reason == "answered", traj.error
    rec = traj.tool_calls[0]
    note = f"\n[tool result truncated: showing {cap} of {MB40} bytes (byte cap)]"
    assert rec.truncated and rec.result_bytes == MB40 and rec.error is None
    assert rec.result == BIG[:cap] + note and tool_messages(traj) == [rec.result]
    assert traj.truncated_tool_results == 1
    # the tokenizer and the template never saw more than the cap (+ note and template glue)
    assert tok.longest_encode <= cap + 200
    assert tok.longest_render <= cap + 2000
    # the model's next context grew by at most the cap, the note and the template's glue
    first = traj.samples[0].loss_mask.index(1)
    turn1 = len(TOK.encode(call("dump"), add_special_tokens=False)) + 1
    assert len(sampler.seen["e0"]) - first - turn1 <= cap + len(note) + 64
    assert peak < MB40 // 8, f"tracemalloc peak {peak / 2**20:.1f} MiB"
    assert seconds < 5


def test_the_token_cap_cuts_within_the_byte_cap():
    text = "abcdefgh" * 500  # 4000 bytes, 4000 byte-tokens
    traj, _ = run(env_of(echo), [call("echo", text=text), "done"],
                  cfg(max_tool_result_bytes=16384, max_tool_result_tokens=100))
    rec = traj.tool_calls[0]
    assert rec.result == text[:100] + ("\n[tool result truncated: showing 100 tokens, 100 of "
                                       "4000 bytes (token cap)]")
    assert rec.truncated and rec.result_bytes == 4000 and traj.truncated_tool_results == 1
    # a token boundary inside a multi-byte character: the partial character is dropped
    capped = cap_tool_text("€" * 50, 16384, 100, TOK)  # 3 byte-tokens per character
    assert capped.text.startswith("€" * 33 + "\n[tool result truncated: showing 100 tokens, "
                                  "99 of 150 bytes (token cap)]")
    assert capped.truncated_by == "tokens"
    # bytes first, then tokens: the note names the token cap and the original size
    both = cap_tool_text(BIG, 16384, 1000, TOK)
    assert both.truncated_by == "tokens" and both.original_bytes == MB40
    assert both.text == BIG[:1000] + (f"\n[tool result truncated: showing 1000 tokens, 1000 "
                                      f"of {MB40} bytes (token cap)]")


@pytest.mark.parametrize("text", [
    "plain ascii result",
    'héllo wörld — 数据 🙂 {"a": [1, 2]}\n\ttabs\r\n' * 20,
    "x" * 4096,  # exactly at both caps below
    "é" * 2048,  # 4096 bytes, exactly at the byte cap
    "",
])
def test_a_result_under_both_caps_is_unchanged_byte_for_byte(text):
    config = cfg(max_tool_result_bytes=4096, max_tool_result_tokens=4096)
    traj, _ = run(env_of(echo), [call("echo", text=text), "done"], config)
    rec = traj.tool_calls[0]
    assert rec.result == text and tool_messages(traj) == [text]
    assert rec.result.encode() == text.encode()
    assert not rec.truncated and rec.result_bytes == len(text.encode())
    assert traj.truncated_tool_results == 0


def test_utf8_prefix_cuts_at_a_character_boundary():
    text = "aé€🙂" * 100  # 1 + 2 + 3 + 4 bytes
    data = text.encode()
    for n in range(0, 60):
        head = utf8_prefix(text, n)
        assert text.startswith(head) and len(head.encode()) <= n
        assert len(head.encode()) > n - 4  # the longest such prefix
    assert utf8_size(text) == len(data) and utf8_size("\udcff") == 3  # a lone surrogate
    assert utf8_prefix("ab\udcffcd", 4) == "ab"


# ------------------------------------------------------------------------------ errors


def test_error_messages_are_capped_too():
    config = cfg(max_tool_result_bytes=256, max_tool_result_tokens=1 << 20, max_turns=4)
    script = [call("explode"),                                          # a huge exception
              '<tool_call>\n{"name": "echo", "arguments": {"text": 1,}}\n</tool_call>',  # bad JSON
              call("nope"),                                             # unknown tool
              "done"]

    class ManyTools(FunctionEnvironment):
        def unknown_tool_message(self, name):
            return "unknown tool; available: " + ", ".join(f"tool_{i}" for i in range(10**5))

    env = ManyTools([echo, explode], lambda ep: ep.update_reward(0.0))
    traj, _ = run(env, script, config)
    assert traj.finish_reason == "answered", traj.error
    boom, unknown = traj.tool_calls
    assert boom.truncated and boom.error.startswith("tool 'explode' failed: RuntimeError: eee")
    assert boom.result.startswith("Error: tool 'explode' failed") and boom.result_bytes > 4 << 20
    assert boom.result.endswith(f"[tool result truncated: showing 256 of {boom.result_bytes} "
                                "bytes (byte cap)]")
    assert unknown.truncated and unknown.result.startswith("Error: unknown tool; available")
    msgs = tool_messages(traj)
    assert all(len(m.encode()) <= 256 + 80 for m in msgs), [len(m) for m in msgs]
    # the parse error is a tool message of its own (no record); with a small cap it is cut
    config = cfg(max_tool_result_bytes=20, max_tool_result_tokens=1 << 20)
    traj, _ = run(env, [script[1], "done"], config)
    assert tool_messages(traj)[0].startswith("Error: tool call is")
    assert "(byte cap)]" in tool_messages(traj)[0] and traj.truncated_tool_results == 1


# ------------------------------------------------------------------------------ environments


def test_caps_apply_to_replay_environments():
    spec = tool_from_spec({"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {
            "id": {"type": "string"}}, "required": ["id"]}}})
    env = ReplayEnvironment([spec], {("lookup", '{"id":"a"}'): {"rows": list(range(10**5))}},
                            not_found="nothing for {tool}: " + "?" * 10**5)
    config = cfg(max_tool_result_bytes=1000, max_tool_result_tokens=1 << 20)
    traj, _ = run(env, [call("lookup", id="a"), call("lookup", id="b"), "done"], config)
    hit, miss = traj.tool_calls
    assert hit.truncated and hit.result.startswith('{"rows": [0, 1, 2')
    assert miss.truncated and miss.error is not None and miss.result.startswith("Error: nothing")
    assert traj.truncated_tool_results == 2


def test_caps_apply_to_sop_environments(tmp_path):
    from mtrl_jax.envs.sop import SopEnvironment, load_sop_domain
    from mtrl_jax.envs.sop_synth import generate_domain

    dom = load_sop_domain(generate_domain("loan_triage", tmp_path, sizes={"test": 2}, seed=1),
                          name="loan_triage")
    task = dom.tasks("test")[0]
    script = [call("get_income", applicant_id=task.data["row"]["applicant_id"]),
              call("get_income", applicant_id="APP-0"), "done"]
    whole, _ = run(SopEnvironment(dom), script, task=task)
    cut, _ = run(SopEnvironment(dom), script, cfg(max_tool_result_bytes=12),
                 task=task)
    assert not any(r.truncated for r in whole.tool_calls)
    for a, b in zip(whole.tool_calls, cut.tool_calls, strict=True):
        assert b.truncated and b.result_bytes == len(a.result.encode())
        assert b.result.startswith(a.result[:12] + "\n[tool result truncated")
    assert cut.tool_calls[1].error is not None and cut.truncated_tool_results == 2


def test_caps_apply_to_a_custom_environment_overriding_call_tool():
    class Custom(Environment):
        async def call_tool(self, call):
            if call.name == "fail":
                raise ToolError("bad: " + "z" * 10**6)
            return {"blob": BIG}  # not even a string

    config = cfg(max_tool_result_bytes=2048, max_tool_result_tokens=1 << 20)
    traj, _ = run(Custom(), [call("get") + call("fail"), "done"], config)
    ok, bad = traj.tool_calls
    assert ok.truncated and ok.result.startswith('{"blob": "0123') and ok.result_bytes > MB40
    assert bad.truncated and bad.error.startswith("bad: zzz")
    assert all(len(m) <= 2048 + 80 for m in tool_messages(traj))


# ------------------------------------------------------------------------------ SQLite


def _table(rows: int, width: int) -> str:
    return ("CREATE TABLE t(id INTEGER, payload TEXT);"
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {rows}) "
            f"INSERT INTO t SELECT i, printf('%.*c', {width}, 'x') FROM c;")


@pytest.mark.parametrize("sql, max_rows", [
    ("SELECT * FROM t a, t b", 10**9),    # 40 000 joined rows of ~1 KB: ~40 MB
    ("SELECT * FROM t a, t b", 200),      # the default row cap: the byte budget still stops it
    ("SELECT id, printf('%.*c', 209715, 'y') FROM t", 200),  # 200 rows of 200 KB
])
def test_sqlite_stops_fetching_at_the_byte_budget(sql, max_rows):
    db = SQLiteSandbox(_table(200, 500), max_rows=max_rows, timeout_s=10)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        res = db.query(sql)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        db.close()
    assert res["truncated"] and res["truncated_by"] == "bytes" and res["max_bytes"] == 4096
    assert len(json.dumps(res)) <= 4096 + 200
    assert seconds < 1.0 and peak < 1 << 20, (seconds, peak)
    assert res["rows"] == [] or res["rows"][0][1] == "x" * 500


def test_sqlite_row_cap_value_limit_and_small_results():
    db = SQLiteSandbox(_table(200, 500) + "CREATE TABLE s(x); INSERT INTO s VALUES (1), (2);",
                       max_rows=3, max_bytes=1 << 20, max_value_bytes=100_000)
    try:
        assert db.query("SELECT x FROM s") == {"columns": ["x"], "rows": [[1], [2]],
                                               "truncated": False}
        res = db.query("SELECT id FROM t ORDER BY id")
        assert res == {"columns": ["id"], "rows": [[1], [2], [3]], "truncated": True}
        with pytest.raises(sqlite3.DataError, match="string or blob too big"):
            db.query("SELECT group_concat(payload) FROM t")  # 100 KB: refused by SQLite
        assert db.query("SELECT count(*) FROM t")["rows"] == [[200]]
    finally:
        db.close()
    with pytest.raises(ValueError):
        SQLiteSandbox("", max_bytes=0)


def test_sql_family_shows_the_truncation_to_the_model():
    note = json.loads(format_sql_result({"columns": ["a"], "rows": [[1]], "truncated": True}, 1))
    assert next(iter(note)) == "note" and note["note"].startswith(
        "truncated: showing 1 row; the result has more (cut at the 1-row limit)")
    task = Task(id="s0", family="sql", name="big", prompt="Dump it.",
                data={"setup_sql": _table(200, 500)})
    script = [call("run_sql", query="SELECT * FROM t a, t b"), "done"]
    # generous loop caps: the model reads the sandbox's own cut, valid JSON with its note
    traj, _ = run(SQLEnvironment(), script, cfg(max_tool_result_tokens=1 << 14),
                  task=task)
    rec = traj.tool_calls[0]
    assert not rec.truncated, rec.result[-200:]
    out = json.loads(rec.result)
    assert out["truncated"] and out["note"].startswith(
        f"truncated: showing {len(out['rows'])} rows; the result has more (cut at the "
        "4096-byte result budget)")
    # the recipe defaults (1024 tokens of a byte tokenizer): cut again, both notes readable
    traj, _ = run(SQLEnvironment(), script, task=task)
    msg = tool_messages(traj)[0]
    assert msg.startswith('{"note": "truncated: showing') and msg.endswith("(token cap)]")
    # a value over SQLite's length limit is an error the model reads, not 40 MB
    traj, _ = run(SQLEnvironment(), [call("run_sql", query="SELECT group_concat(a.payload) "
                                                           "FROM t a, t b"), "done"], task=task)
    assert tool_messages(traj) == ["Error: string or blob too big"]


# ------------------------------------------------------------------------------ config, metrics


def test_config_validation_and_recipe_plumbing():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_tool_result"):
            AgentLoopConfig(max_tool_result_bytes=bad)
        with pytest.raises(ValueError, match="max_tool_result"):
            AgentLoopConfig(max_tool_result_tokens=bad)
    from mtrl_jax.config import RolloutSection

    r = RolloutSection(max_turns=3, max_tool_result_bytes=100, max_tool_result_tokens=50)
    c = AgentLoopConfig.from_rollout(r)
    assert (c.max_turns, c.max_tool_result_bytes, c.max_tool_result_tokens) == (3, 100, 50)
    assert (c.sampling_max_tokens, c.max_context_tokens) == (r.sampling_max_tokens,
                                                             r.max_context_tokens)
    assert AgentLoopConfig.from_rollout(SimpleNamespace(**vars(r)), max_turns=9).max_turns == 9


def test_truncated_results_reach_the_episode_metrics():
    from mtrl_jax.evaluation.metrics import episode_metrics

    config = cfg(max_tool_result_bytes=100)
    cut, _ = run(env_of(echo), [call("echo", text="x" * 300), "done"], config)
    whole, _ = run(env_of(echo), [call("echo", text="x" * 30), "done"], config)
    assert (cut.truncated_tool_results, whole.truncated_tool_results) == (1, 0)
    assert episode_metrics([cut, cut, whole, whole])["tool_truncations/mean"] == 0.5
