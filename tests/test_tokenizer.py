"""Tokenizer and chat template loaded from a checkpoint directory (transformers, no torch)."""

import json

import pytest

from mtrl_jax.models.tokenizer import (
    build_byte_tokenizer,
    encode_chat,
    load_tokenizer,
    render_chat,
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]},
    {"role": "tool", "content": "sunny, 21C"},
    {"role": "tool", "content": "rain, 15C"},
    {"role": "assistant", "content": "Paris is sunny, Rome rainy."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_byte_tokenizer().save_pretrained(d)
    return d


def test_renders_tools_and_tool_calls_in_qwen_format(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = render_chat(tok, CONVERSATION, tools=TOOLS, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    tools_block = text.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(tools_block) == TOOLS[0]
    calls = [json.loads(c.split("\n</tool_call>")[0])
             for c in text.split("<|im_start|>assistant\n<tool_call>\n")[1].split(
                 "<tool_call>\n")]
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                     {"name": "get_weather", "arguments": {"city": "Rome"}}]
    # consecutive tool results share one user turn
    assert ("<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response>\n"
            "<tool_response>\nrain, 15C\n</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>assistant\nParis is sunny, Rome rainy.<|im_end|>\n")


def test_generation_prompt_and_exact_token_round_trip(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = render_chat(tok, CONVERSATION[:2])
    assert text.endswith("<|im_start|>assistant\n")
    ids = encode_chat(tok, CONVERSATION, tools=TOOLS)
    assert tok.decode(ids) == render_chat(tok, CONVERSATION, tools=TOOLS)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 5  # one special token per turn end, never split into bytes
    assert tok.eos_token == "<|im_end|>"


def test_missing_directory_or_template_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    tok = build_byte_tokenizer(chat_template=None)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path)
