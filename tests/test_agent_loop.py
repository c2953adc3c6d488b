"""The agent loop with a scripted sampler: literal token lists, masks, errors, finish reasons."""

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrl_jax.envs.base import Environment, FunctionEnvironment, Task
from mtrl_jax.envs.tools import tool, tool_from_spec, validate_arguments
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.parsing import parse_tool_calls
from mtrl_jax.rollout.sampler import ScriptedSampler

TOK = build_byte_tokenizer()
IM_END = TOK.convert_tokens_to_ids("<|im_end|>")


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
      a: first term.
      b: second term.
    """
    return a + b


@tool
async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return "done"


@tool
def boom() -> str:
    """Always fails."""
    raise RuntimeError("kaboom")


def call(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def make_env(reward=lambda ep: ep.update_reward(1.0 if ep.final_text == "5" else 0.0)):
    env = FunctionEnvironment([add, slow, boom], reward)
    env.tool_timeout_s = 0.2
    return env


TASK = Task(id="t0", family="test", name="add", prompt="What is 2+3?", system="Use tools.")


def run(script, config=None, env=None, task=TASK):
    config = config or AgentLoopConfig()
    sampler = ScriptedSampler(TOK, lambda eid, turn, toks: script[turn], IM_END, logprob=-0.25)
    loop = AgentLoop(TOK, sampler, config)
    return asyncio.run(loop.run(env or make_env(), task, episode_id="e0")), sampler


def test_literal_token_list_and_masks():
    traj, sampler = run([call("add", a=2, b=3), "5"])
    assert traj.finish_reason == "answered" and traj.num_turns == 2 and traj.reward == 1.0
    assert len(traj.samples) == 1 and traj.template_rewrites == 0
    s = traj.samples[0]
    tools = [add.openai_schema(), slow.openai_schema(), boom.openai_schema()]
    msgs = [{"role": "system", "content": "Use tools."},
            {"role": "user", "content": "What is 2+3?"}]
    prompt = TOK.encode(TOK.apply_chat_template(msgs, tools=tools, tokenize=False,
                                                add_generation_prompt=True),
                        add_special_tokens=False)
    turn1 = TOK.encode(call("add", a=2, b=3), add_special_tokens=False) + [IM_END]
    delta = TOK.encode("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                       "<|im_start|>assistant\n", add_special_tokens=False)
    turn2 = TOK.encode("5", add_special_tokens=False) + [IM_END]
    assert s.tokens == prompt + turn1 + delta + turn2
    assert s.loss_mask == [0] * len(prompt) + [1] * len(turn1) + [0] * len(delta) + [1] * len(turn2)
    assert s.logprobs == [0.0] * len(prompt) + [-0.25] * len(turn1) + [0.0] * len(delta) + \
        [-0.25] * len(turn2)
    assert s.turn_index == [0] * (len(prompt) + len(turn1)) + [1] * (len(delta) + len(turn2))
    # the sampler saw the whole episode so far on the second turn, never a re-tokenised history
    assert sampler.seen["e0"] == prompt + turn1 + delta
    # the episode's tokens decode to exactly what the template renders for the conversation
    full = TOK.apply_chat_template(traj.messages, tools=tools, tokenize=False)
    assert TOK.decode(s.tokens, skip_special_tokens=False) + "\n" == full
    assert [(r.name, r.arguments, r.result, r.error) for r in traj.tool_calls] == \
        [("add", {"a": 2, "b": 3}, "5", None)]


def test_bad_model_output_becomes_feedback_not_a_crash():
    script = ['<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # bad JSON
              call("nope", x=1),                     # unknown tool
              call("add", a="2", b=3),               # wrong type
              call("add", a=1),                      # missing argument
              call("boom"),                          # exception
              call("slow", seconds=5.0),             # timeout
              call("add", a=2, b=3) + call("add", a=1, b=1, c=3),  # one good, one bad
              "5"]
    traj, _ = run(script, AgentLoopConfig(max_turns=10))
    assert traj.finish_reason == "answered" and traj.reward == 1.0
    assert traj.format_errors == 1
    errors = [r.error for r in traj.tool_calls]
    assert errors[0].startswith("unknown tool 'nope'")
    assert "a: expected integer, got str" in errors[1]
    assert "missing required argument 'b'" in errors[2]
    assert "RuntimeError: kaboom" in errors[3]
    assert "timed out after 0.2 s" in errors[4]
    assert errors[5] is None and "unknown argument 'c'" in errors[6]
    assert traj.tool_error_count == 6
    tool_msgs = [m["content"] for m in traj.messages if m["role"] == "tool"]
    assert tool_msgs[0].startswith("Error: tool call is not valid JSON")
    assert tool_msgs[1].startswith("Error: unknown tool 'nope'")


def test_finish_reasons():
    traj, _ = run([call("add", a=1, b=1)] * 3, AgentLoopConfig(max_turns=3))
    assert traj.finish_reason == "max_turns" and traj.num_turns == 3
    traj, _ = run(["x" * 50], AgentLoopConfig(sampling_max_tokens=10))
    assert traj.finish_reason == "truncated" and traj.truncated_turns == 1
    assert sum(traj.samples[0].loss_mask) == 10
    prompt_len = traj.samples[0].loss_mask.index(1)
    limit = prompt_len + 80  # room for one call (~50 tokens), not for its result as well
    traj, _ = run([call("add", a=1, b=1)] * 5, AgentLoopConfig(max_context_tokens=limit))
    assert traj.finish_reason == "truncated" and traj.truncated_turns == 0
    assert len(traj.samples[0]) <= limit
    traj, _ = run(["5"], AgentLoopConfig(max_context_tokens=prompt_len))  # prompt fills it
    assert traj.finish_reason == "truncated" and traj.num_turns == 0


def test_environment_failures_end_only_that_episode_and_teardown_runs():
    class Broken(Environment):
        torn_down = False

        async def setup(self, task):
            raise OSError("no database")

        async def teardown(self):
            Broken.torn_down = True

    traj, _ = run(["5"], env=Broken())
    assert traj.finish_reason == "error" and "OSError: no database" in traj.error
    assert Broken.torn_down


def test_per_turn_reward_and_reward_errors():
    traj, _ = run([call("add", a=2, b=3), "5"],
                  env=make_env(lambda ep: ep.update_reward([0.25, 0.75], {"x": 1})))
    assert traj.turn_rewards == [0.25, 0.75] and traj.reward == 1.0
    assert traj.reward_metrics == {"x": 1.0}
    traj, _ = run(["5"], env=make_env(lambda ep: ep.update_reward([1.0, 2.0])))
    assert traj.finish_reason == "error" and "per-turn reward has 2 values" in traj.error


def test_template_rewrite_is_detected_and_starts_a_new_sample():
    # a template that drops earlier assistant text from history (like reasoning stripping)
    tok = build_byte_tokenizer(chat_template=(
        "{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
        "{{- '<|im_start|>assistant\n[elided]<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\n' }}{%- endif %}"))
    script = [call("add", a=2, b=3), call("add", a=1, b=1), "5"]
    sampler = ScriptedSampler(tok, lambda e, t, k: script[t], IM_END)
    loop = AgentLoop(tok, sampler, AgentLoopConfig())
    traj = asyncio.run(loop.run(make_env(), TASK))
    assert traj.finish_reason == "answered"
    # turn 1 -> tool result renders fine (the last assistant is shown); turn 2 elides turn 1
    assert traj.template_rewrites >= 1 and len(traj.samples) == 1 + traj.template_rewrites
    assert all(sum(s.loss_mask) > 0 for s in traj.samples)
    strict = AgentLoop(tok, ScriptedSampler(tok, lambda e, t, k: script[t], IM_END),
                       AgentLoopConfig(on_template_rewrite="fail"))
    traj = asyncio.run(strict.run(make_env(), TASK))
    assert traj.finish_reason == "error" and "TemplateRewriteError" in traj.error


def test_many_concurrent_episodes_with_groups():
    sampler = ScriptedSampler(TOK, lambda e, t, k: [call("add", a=2, b=3), "5"][t], IM_END,
                              delay_s=0.01)
    loop = AgentLoop(TOK, sampler)
    tasks = [Task(id=f"t{i}", family="test", name="add", prompt="2+3?") for i in range(20)]
    trajs = asyncio.run(loop.run_many(lambda t: make_env(), tasks, group_size=4, concurrency=64))
    assert len(trajs) == 80 and all(t.reward == 1.0 for t in trajs)
    assert [t.group_id for t in trajs[:5]] == ["t0"] * 4 + ["t1"]


# ------------------------------------------------------------------------------ tools


def test_schema_from_type_hints_and_docstring():
    from typing import Literal

    @tool
    def search(query: str, limit: int = 5, mode: Literal["fast", "exact"] = "fast",
               tags: list[str] | None = None) -> str:
        """Search the catalogue.

        Args:
          query: words to look for.
          limit: at most this many hits.
        """
        return ""

    p = search.parameters
    assert search.description == "Search the catalogue."
    assert p["required"] == ["query"]
    assert p["properties"]["query"] == {"type": "string", "description": "words to look for."}
    assert p["properties"]["mode"]["enum"] == ["fast", "exact"]
    assert p["properties"]["tags"] == {"type": "array", "items": {"type": "string"},
                                       "default": None}
    assert validate_arguments(search, {"query": "x", "mode": "slow"}) == \
        ["mode: 'slow' is not one of ['fast', 'exact']"]


def test_bedrock_and_openai_specs():
    bedrock = {"toolSpec": {"name": "lookup", "description": "Find a row",
                            "inputSchema": {"json": {"type": "object",
                                                     "properties": {"id": {"type": "string"}},
                                                     "required": ["id"]}}}}
    openai = {"type": "function", "function": bedrock["toolSpec"] | {
        "parameters": bedrock["toolSpec"]["inputSchema"]["json"]}}
    a, b = tool_from_spec(bedrock), tool_from_spec(openai)
    assert a.parameters == b.parameters and a.name == b.name == "lookup"
    assert validate_arguments(a, {}) == ["missing required argument 'id'"]
    with pytest.raises(ValueError, match="unrecognised tool spec"):
        tool_from_spec({"foo": 1})


# ------------------------------------------------------------------------------ parser fuzz


@given(st.text(max_size=300))
def test_parser_never_crashes_on_any_text(text):
    parsed = parse_tool_calls(text)
    assert isinstance(parsed.content, str)


@given(st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "{", "}", '"name"', ":", ",",
                                 '"add"', '"arguments"', "[", "]", "null", "1", " ", "\n",
                                 '"x"', "\\", "<", "tool_call"]), max_size=40))
def test_parser_never_crashes_on_tag_soup(parts):
    parsed = parse_tool_calls("".join(parts))
    for c in parsed.tool_calls:
        assert isinstance(c.name, str) and isinstance(c.arguments, dict)


def test_parser_cases():
    p = parse_tool_calls("Let me check." + call("add", a=1, b=2) + call("add", a=3, b=4))
    assert p.content == "Let me check." and [c.arguments for c in p.tool_calls] == \
        [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    p = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert p.tool_calls[0].arguments == {"x": 1}
    assert parse_tool_calls("<tool_call>{\"name\": \"f\"").errors[0].startswith("unclosed")
    assert "lacks a string 'name'" in parse_tool_calls("<tool_call>{}</tool_call>").errors[0]
    assert "must be a JSON object" in parse_tool_calls(
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>').errors[0]
    assert not parse_tool_calls("plain answer").attempted_tool_call
