"""Tool specs reach the model whatever its chat template: a template without a tool section
gets them in the system message, in the words of our own tool template."""

import asyncio

import pytest

from mtrl_jax.envs.base import FunctionEnvironment, Task
from mtrl_jax.envs.tools import tool
from mtrl_jax.models.tokenizer import (
    build_byte_tokenizer,
    render_chat,
    template_renders_tools,
)
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.sampler import ScriptedSampler

# a plain ChatML template with no tool section (like SmolLM2's)
PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@tool
def lookup(key: str, limit: int = 3) -> str:
    """Look a key up.

    Args:
      key: what to look up (ünïcode welcome).
      limit: at most this many rows.
    """
    return f"{key}={limit}"


TOOLS = [lookup.openai_schema()]


def test_fallback_renders_our_tool_section_in_the_system_message():
    native, plain = build_byte_tokenizer(), build_byte_tokenizer(chat_template=PLAIN_CHATML)
    assert template_renders_tools(native) and not template_renders_tools(plain)
    for messages in ([{"role": "system", "content": "Be exact."},
                      {"role": "user", "content": "find x"}],
                     [{"role": "user", "content": "find x"}]):
        want = render_chat(native, messages, tools=TOOLS)
        got = render_chat(plain, messages, tools=TOOLS)
        assert got == want
        assert '"name": "lookup"' in got and "<tools>" in got and "ünïcode" in got
    # without tools nothing is added
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(plain, msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_agent_loop_with_a_toolless_template_shows_the_tools_and_keeps_the_prefix():
    tok = build_byte_tokenizer(chat_template=PLAIN_CHATML)
    plan = ['<tool_call>\n{"name": "lookup", "arguments": {"key": "x"}}\n</tool_call>', "done"]
    sampler = ScriptedSampler(tok, lambda eid, turn, _: plan[turn], tok.eos_token_id)
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=3, max_context_tokens=4096))
    env = FunctionEnvironment([lookup], lambda ep: ep.update_reward(1.0))
    traj = asyncio.run(loop.run(env, Task(id="t", family="f", name="n", prompt="find x",
                                              system="Be exact."),
                                episode_id="t"))
    assert traj.finish_reason == "answered" and traj.num_turns == 2
    assert traj.tool_calls[0].result == "x=3" and traj.template_rewrites == 0
    (sample,) = traj.samples
    text = tok.decode(sample.tokens)
    assert "<tools>" in text and '"name": "lookup"' in text
    assert text.index("<tools>") < text.index("find x")  # in the system turn, before the task
    assert text.startswith("<|im_start|>system\nBe exact.\n\n# Tools")


def test_tool_specs_template_leaves_the_tools_to_the_template():
    """``tool_specs: template`` (the CPU demo: its model learned the tools in training): a
    template without a tool section shows none; one with a tool section still shows them."""
    plan = ['<tool_call>\n{"name": "lookup", "arguments": {"key": "x"}}\n</tool_call>', "done"]
    texts = {}
    for name, template in (("plain", PLAIN_CHATML), ("native", None)):
        tok = (build_byte_tokenizer(chat_template=template) if template
               else build_byte_tokenizer())
        sampler = ScriptedSampler(tok, lambda eid, turn, _: plan[turn], tok.eos_token_id)
        loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=3, max_context_tokens=4096,
                                                       tool_specs="template"))
        env = FunctionEnvironment([lookup], lambda ep: ep.update_reward(1.0))
        traj = asyncio.run(loop.run(env, Task(id="t", family="f", name="n", prompt="find x"),
                                    episode_id="t"))
        assert traj.finish_reason == "answered" and traj.tool_calls[0].result == "x=3"
        texts[name] = tok.decode(traj.samples[0].tokens)
    assert "<tools>" not in texts["plain"] and "lookup" not in texts["plain"].split("find x")[0]
    assert "<tools>" in texts["native"]
    with pytest.raises(ValueError, match="tool_specs"):
        AgentLoopConfig(tool_specs="system")
