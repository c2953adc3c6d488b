"""A reference model behind an OpenAI-compatible endpoint: a local server on 127.0.0.1 that
speaks the protocol, backed by our JAX model, and the text-level evaluation through it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from mtrl_jax.config import load_config
from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator
from mtrl_jax.evaluation.openai_compat import OpenAIChatClient, _to_template, serve_openai
from mtrl_jax.rollout.parsing import parse_tool_calls
from mtrl_jax.rollout.runner import build_policy
from tests.async_envs import make_fields_env
from tests.test_evaluator import _tasks
from tests.test_trainer import TINY


@pytest.fixture(scope="module")
def server():
    tok, model = build_policy(load_config(overrides=TINY))
    srv, url = serve_openai(model, tok, seed=0)
    yield url
    srv.shutdown()


def test_protocol(server):
    c = OpenAIChatClient(server, "mtrl-local")
    r = c.chat([{"role": "user", "content": "hi"}], None, temperature=0.0, max_tokens=8)
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert 1 <= r["usage"]["completion_tokens"] <= 8
    again = c.chat([{"role": "user", "content": "hi"}], None, temperature=0.0, max_tokens=8)
    assert again["choices"][0]["message"] == r["choices"][0]["message"]  # greedy: same text
    with urllib.request.urlopen(server + "/models") as f:
        assert json.load(f)["data"][0]["id"] == "mtrl-local"
    with pytest.raises(RuntimeError, match="HTTP 400"):
        c.chat([], None, temperature=0.0, max_tokens=4)
    req = urllib.request.Request(server + "/nope", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req)


def test_tool_calls_round_trip_through_the_template_format():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = _to_template(msgs)
    parsed = parse_tool_calls(out[1]["content"])
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather",
                                                                   {"city": "Paris"})]
    assert out[2] == {"role": "tool", "name": "get_weather", "content": "sunny"}


def test_reference_column_matches_our_own_greedy_play(server, tmp_path):
    """The endpoint serves the base model: text-level greedy episodes through it give the same
    answers and scores as our token-level evaluation of the same model."""
    ev = MultiTurnRLEvaluator(overrides=TINY + ["rollout.max_turns=1"], tasks=_tasks("test", 4),
                              make_env=make_fields_env, samples_per_task=2,
                              reference_endpoint=server, reference_model="mtrl-local",
                              output_dir=tmp_path / "ev", verbose=False)
    res = ev.evaluate()
    assert set(res["models"]) == {"base", "reference"}
    base_g, ref_g = ev.plays["base"].greedy, ev.plays["reference"].greedy
    assert [t.error for t in ref_g] == [None] * 4
    said = [t.messages[-1]["content"] for t in base_g]
    assert all(said) and [t.messages[-1]["content"] for t in ref_g] == said
    assert [t.finish_reason for t in ref_g] == [t.finish_reason for t in base_g]
    assert [t.final_text for t in ref_g] == [t.final_text for t in base_g]
    assert [t.reward for t in ref_g] == [t.reward for t in base_g]
    for k in ("greedy/strict_success", "greedy/reward/mean", "greedy/completion_rate",
              "strict_pass_k_2"):
        assert k in res["models"]["reference"]
    assert len(ev.plays["reference"].sampled) == 4 * 2
