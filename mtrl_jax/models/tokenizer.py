"""Tokenizers and chat templates, from the checkpoint directory, through transformers (no torch).

A model is trained on its own chat template, so the conversation -- system prompt, tool
definitions, assistant tool calls, tool results -- is rendered by the template shipped in the
checkpoint's ``tokenizer_config.json`` / ``chat_template.jinja``, never by a format of ours.

For tiny test and demo models without a real checkpoint, :func:`build_byte_tokenizer` makes a
byte-level tokenizer (256 byte tokens + special tokens, exact round trip) with
:data:`TOOL_CHAT_TEMPLATE`, a template of ours in the Qwen2.5 / Hermes tool format: tool
schemas as JSON lines inside ``<tools></tools>`` in the system turn, calls as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the assistant turn, results as
``<tool_response>...</tool_response>`` in a user turn.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: Qwen2.5-style ChatML template with tools (written for this project).
TOOL_CHAT_TEMPLATE = """
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none %}
{%- if tools or sys is not none %}
    {{- '<|im_start|>system\\n' }}
    {{- sys if sys is not none else 'You are a helpful assistant.' }}
    {%- if tools %}
        {{- '\\n\\n# Tools\\n\\nFunction signatures, one JSON object per line:\\n<tools>' }}
        {%- for tool in tools %}
            {{- '\\n' }}{{- tool | tojson }}
        {%- endfor %}
        {{- '\\n</tools>\\n\\nTo call a function, answer with one JSON object per call inside '
            'tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
            '\\n</tool_call>' }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == 'system' %}
    {%- elif m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- elif m.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if m.content %}{{- '\\n' + m.content }}{%- endif %}
        {%- for call in m.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
            {%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
""".strip()

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                         "</tool_call>", "<tool_response>", "</tool_response>")


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer (and its chat template) of a local checkpoint directory or ``.gguf`` file;
    never downloads."""
    path = os.fspath(path)
    from mtrl_jax.models.gguf import GGUFCheckpoint, is_gguf

    if is_gguf(path):
        tok = GGUFCheckpoint(path).tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{path}: the GGUF file has no chat template "
                             "(tokenizer.chat_template)")
        return tok
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    cls_name = None
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            cls_name = json.load(f).get("tokenizer_class")
    if cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        # a generic tokenizers file (e.g. our byte/word tokenizers): AutoTokenizer would pick
        # the class of config.json's model_type and replace its pre-tokenizer
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{path}: the tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja)")
    return tok


_PROBE_TOOL_NAME = "mtrl_probe_tool_3f9c"
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE_TOOL_NAME, "description": "probe",
    "parameters": {"type": "object", "properties": {}}}}


def template_renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template shows the ``tools`` it is given (many instruct templates,
    SmolLM2's among them, have no tool section and drop them silently)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         tools=[_PROBE_TOOL], tokenize=False,
                                         add_generation_prompt=True)
    return _PROBE_TOOL_NAME in text


def tools_system_text(tools: list[dict[str, Any]], system: str | None = None) -> str:
    """The system message that carries ``tools`` when the template cannot: the same words as
    :data:`TOOL_CHAT_TEMPLATE`'s tool section (Hermes format: JSON signatures in ``<tools>``,
    calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), which is what
    :func:`mtrl_jax.rollout.parsing.parse_tool_calls` reads back."""
    lines = [system if system is not None else "You are a helpful assistant.", "", "# Tools", "",
             "Function signatures, one JSON object per line:", "<tools>"]
    lines += [json.dumps(t, ensure_ascii=False) for t in tools]
    lines += ["</tools>", "", "To call a function, answer with one JSON object per call inside "
              "tags:", "<tool_call>", '{"name": <function-name>, "arguments": '
              '<args-json-object>}', "</tool_call>"]
    return "\n".join(lines)


def with_tools_in_system(messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                         ) -> list[dict[str, Any]]:
    """``messages`` with the tool section of :func:`tools_system_text` in the system message
    (added first when there is none)."""
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": tools_system_text(tools, messages[0]["content"])},
                *messages[1:]]
    return [{"role": "system", "content": tools_system_text(tools)}, *messages]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *,
                tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                template_has_tools: bool | None = None, **template_kwargs) -> str:
    """The conversation as the model's template renders it (tools in OpenAI function format).

    Tool fallback: when the template does not render ``tools`` (``template_has_tools``; found
    out by :func:`template_renders_tools` when None), the tool specs go into the system message
    by :func:`with_tools_in_system` instead, so they reach the model whatever its template."""
    if tools:
        if template_has_tools is None:
            template_has_tools = template_renders_tools(tokenizer)
        if not template_has_tools:
            messages, tools = with_tools_in_system(messages, tools), None
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *,
                tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                **template_kwargs) -> list[int]:
    """Token ids of :func:`render_chat`'s text (special tokens recognised, none added)."""
    text = render_chat(tokenizer, messages, tools=tools,
                       add_generation_prompt=add_generation_prompt, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def build_byte_tokenizer(special_tokens: tuple[str, ...] = CHATML_SPECIAL_TOKENS,
                         chat_template: str = TOOL_CHAT_TEMPLATE,
                         eos_token: str = "<|im_end|>",
                         pad_token: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are bytes, then ``special_tokens`` in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable unicode char; give byte b the id b.
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) <= set(byte_to_unicode)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token)
    fast.chat_template = chat_template
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (the one ByteLevel uses)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


#: ChatML without the tool-definition block: for tiny demo models that learn their tools in a
#: supervised warm-up (the definitions would be most of every episode's tokens).
COMPACT_CHAT_TEMPLATE = """
{%- for m in messages %}
    {%- if m.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
""".strip()

#: Word-level pieces: quoted lower-case identifiers ("name", "pass") as one token, words with
#: an optional numeric suffix (U47, A6), whole numbers, and single punctuation characters.
WORD_PATTERN = r'"[a-z_]+"|[A-Za-z_]+[0-9]*|[0-9]+|[^\sA-Za-z0-9_]'
WORD_SPECIAL_TOKENS = CHATML_SPECIAL_TOKENS + ("<final_output>", "</final_output>", "<unk>")


def word_pieces(text: str) -> list[str]:
    import re

    specials = "|".join(re.escape(s) for s in WORD_SPECIAL_TOKENS)
    return re.findall(f"{specials}|{WORD_PATTERN}", text)


def build_word_tokenizer(corpus: list[str], *, chat_template: str = COMPACT_CHAT_TEMPLATE,
                         eos_token: str = "<|im_end|>",
                         pad_token: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every piece of ``corpus`` (see
    :data:`WORD_PATTERN`); unseen pieces map to ``<unk>``. Whitespace is not kept: decoding
    joins pieces with single spaces, which JSON and the tool-call parser accept. Episodes are
    4-6x shorter than with bytes, which is what makes a CPU demo fast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pieces = sorted({p for text in corpus for p in word_pieces(text)} - set(WORD_SPECIAL_TOKENS))
    vocab = {s: i for i, s in enumerate(WORD_SPECIAL_TOKENS)}
    for p in pieces:
        vocab[p] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated", invert=False)])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(WORD_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token,
                                   unk_token="<unk>")
    fast.chat_template = chat_template
    return fast
