"""A reference model behind an OpenAI-compatible chat endpoint, through the same environment and
strict scorer (text level), and a small local server that speaks the protocol for tests.

:func:`run_reference_episode` is the text-level agent loop: ``POST {base_url}/chat/completions``
with the conversation and the environment's tool schemas; ``tool_calls`` in the reply run in the
environment (results go back as ``tool`` messages); a reply without tool calls is the final
answer. The environment's reward and the strict scorer then score it like any episode. Works
with a frontier API or a vLLM server (``base_url`` ending in ``/v1``).

:func:`serve_openai` serves ``/v1/chat/completions`` (and ``/v1/models``) on 127.0.0.1 from our
own JAX model: the conversation is rendered with the model's chat template (tools included), a
turn is sampled, and ``<tool_call>`` blocks come back as OpenAI ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mtrl_jax.envs.base import Environment, Episode, Task, ToolError
from mtrl_jax.envs.scoring import strict_score
from mtrl_jax.envs.tools import MAX_JSON_DEPTH, json_text_too_deep
from mtrl_jax.rollout.agent_loop import cap_tool_text
from mtrl_jax.rollout.parsing import ToolCall, parse_tool_calls
from mtrl_jax.rollout.trajectory import ToolCallRecord, Trajectory

# ------------------------------------------------------------------------------ client


class OpenAIChatClient:
    """Minimal ``/chat/completions`` client (stdlib only)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
             temperature: float, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "temperature": temperature, "max_tokens": max_tokens}
        if tools:
            body["tools"] = tools
        req = urllib.request.Request(f"{self.base_url}/chat/completions",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.base_url}: HTTP {e.code}: {e.read()[:500]!r}") from e


async def run_reference_episode(client: OpenAIChatClient, env: Environment, task: Task, *,
                                max_turns: int, temperature: float, max_tokens: int,
                                episode_id: str | None = None,
                                max_tool_result_bytes: int = 16384) -> Trajectory:
    """One text-level episode against the endpoint; scored like any other (strict score filled
    in when the task has expected fields). Never raises for endpoint or tool errors. A tool
    message longer than ``max_tool_result_bytes`` of UTF-8 is cut, with a note (the endpoint's
    tokenizer is not ours: no token cap here)."""
    episode_id = episode_id or uuid.uuid4().hex
    t0 = time.perf_counter()
    api: list[dict[str, Any]] = []    # the conversation as the endpoint sees it
    ours: list[dict[str, Any]] = []   # as our environments see it (role/content/name)
    records: list[ToolCallRecord] = []
    final_text, finish, turns, error, fmt_errors = None, "max_turns", 0, None, 0
    tokens = 0
    try:
        await env.setup(task)
        tools = [t.openai_schema() for t in env.tools()]
        if task.system is not None:
            api.append({"role": "system", "content": task.system})
        api.append({"role": "user", "content": task.prompt})
        ours.extend(dict(m) for m in api)
        for turn in range(max_turns):
            reply = await asyncio.to_thread(client.chat, api, tools, temperature=temperature,
                                            max_tokens=max_tokens)
            turns = turn + 1
            choice = reply["choices"][0]
            msg = choice["message"]
            tokens += int(reply.get("usage", {}).get("completion_tokens", 0))
            content = msg.get("content") or ""
            calls = msg.get("tool_calls") or []
            api.append({"role": "assistant", "content": content,
                        **({"tool_calls": calls} if calls else {})})
            ours.append({"role": "assistant", "content": content})
            if choice.get("finish_reason") == "length":
                finish = "truncated"
                break
            if not calls:
                final_text, finish = content, "answered"
                break
            for c in calls:
                name = c["function"]["name"]
                try:
                    raw_args = c["function"].get("arguments") or "{}"
                    if json_text_too_deep(raw_args):
                        raise ValueError(f"arguments nest JSON deeper than {MAX_JSON_DEPTH} "
                                         "levels")
                    args = json.loads(raw_args)
                    if not isinstance(args, dict):
                        raise ValueError("arguments must be a JSON object")
                    result = await env.call_tool(ToolCall(name, args))
                    rec = ToolCallRecord(turn, name, args, result, None)
                except (ToolError, ValueError) as e:
                    fmt_errors += isinstance(e, ValueError)
                    rec = ToolCallRecord(turn, name, c["function"].get("arguments"),
                                         f"Error: {e}", str(e))
                capped = cap_tool_text(str(rec.result), max_tool_result_bytes, 1 << 62, None)
                if capped.truncated:
                    rec = dataclasses.replace(rec, result=capped.text, truncated=True,
                                              result_bytes=capped.original_bytes)
                records.append(rec)
                api.append({"role": "tool", "tool_call_id": c.get("id", ""),
                            "content": rec.result})
                ours.append({"role": "tool", "name": name, "content": rec.result})
    except Exception as e:  # the endpoint or the environment failed
        finish, error = "error", f"{type(e).__name__}: {e}"
    finally:
        try:
            await env.teardown()
        except Exception as e:
            finish, error = "error", (error or "") + f" teardown: {e}"
    reward, metrics = 0.0, {}
    if error is None:
        episode = Episode(task, ours, final_text, finish, turns, records)
        try:
            env.reward(episode)
            r = episode.reward
            reward = float(sum(r)) if isinstance(r, list) else float(r or 0.0)
            metrics = episode.metrics
        except Exception as e:
            finish, error = "error", f"reward failed: {e}"
    traj = Trajectory(task_id=task.id, episode_id=episode_id, samples=[], messages=ours,
                      finish_reason=finish, num_turns=turns, final_text=final_text,
                      reward=reward, reward_metrics=metrics, tool_calls=records, error=error,
                      format_errors=fmt_errors, group_id=task.id,
                      timings={"total_s": time.perf_counter() - t0,
                               "completion_tokens": float(tokens)})
    if task.expected:
        traj.strict_score = strict_score(final_text, task.expected)
    return traj


# ------------------------------------------------------------------------------ server


def _to_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> the chat template's: tool calls back into ``<tool_call>`` text (the
    format our models emit), tool results named after their call."""
    out, names = [], {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = []
            for c in m["tool_calls"]:
                names[c.get("id", "")] = c["function"]["name"]
                raw_args = c["function"].get("arguments") or "{}"
                try:
                    args = (raw_args if json_text_too_deep(raw_args) else json.loads(raw_args))
                except ValueError:
                    args = raw_args  # shown as the model wrote it
                blocks.append("<tool_call>\n" + json.dumps(
                    {"name": c["function"]["name"], "arguments": args}) + "\n</tool_call>")
            text = (m.get("content") or "")
            out.append({"role": "assistant",
                        "content": (text + "\n" if text else "") + "\n".join(blocks)})
        elif m["role"] == "tool":
            out.append({"role": "tool", "name": names.get(m.get("tool_call_id", ""), "tool"),
                        "content": m["content"]})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def serve_openai(model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0,
                 model_name: str = "mtrl-local", max_len: int = 4096):
    """Serve ``model`` over the OpenAI chat protocol in a background thread; returns
    ``(server, base_url)`` (``base_url`` ends in ``/v1``; ``server.shutdown()`` stops it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtrl_jax.models.decoding import SamplingParams, bucket_length, generate
    from mtrl_jax.models.transformer import init_cache

    lock = threading.Lock()
    counter = [0]
    stop = tokenizer.eos_token_id

    def complete(body: dict[str, Any]) -> dict[str, Any]:
        text = tokenizer.apply_chat_template(_to_template(body["messages"]),
                                             tools=body.get("tools") or None, tokenize=False,
                                             add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        max_tokens = int(body.get("max_tokens") or 256)
        params = SamplingParams(temperature=float(body.get("temperature", 1.0)),
                                top_p=float(body.get("top_p", 1.0)),
                                max_tokens=max_tokens, stop_token_ids=(stop,))
        width = bucket_length(len(ids), 16)
        inputs = np.zeros((1, width), np.int32)
        inputs[0, :len(ids)] = ids
        with lock:
            key = jax.random.fold_in(jax.random.key(seed), counter[0])
            counter[0] += 1
            out = generate(model, init_cache(model.cfg, 1, max_len), jnp.asarray(inputs),
                           jnp.asarray([len(ids)], jnp.int32), key, params,
                           max_new=jnp.asarray([max_tokens], jnp.int32),
                           max_new_tokens=bucket_length(max_tokens, 8))
        n = int(np.asarray(out.num_tokens)[0])
        toks = np.asarray(out.tokens)[0, :n].tolist()
        stopped = bool(np.asarray(out.stopped)[0])
        if stopped and toks[-1:] == [stop]:
            toks = toks[:-1]
        raw = tokenizer.decode(toks, skip_special_tokens=False)
        parsed = parse_tool_calls(raw)
        calls = [{"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                  "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                 for c in parsed.tool_calls]
        message: dict[str, Any] = {"role": "assistant",
                                   "content": parsed.content if calls else raw}
        if calls:
            message["tool_calls"] = calls
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if calls else
                             ("stop" if stopped else "length")}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                          "total_tokens": len(ids) + n}}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name,
                                                              "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body.get("messages"), list) or not body["messages"]:
                    raise ValueError("'messages' must be a non-empty list")
                self._send(200, complete(body))
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="mtrl-openai").start()
    return server, f"http://{host}:{server.server_address[1]}/v1"
