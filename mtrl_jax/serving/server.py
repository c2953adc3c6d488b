"""``mtrl serve``: our JAX model behind the subset of vLLM's HTTP API in
:mod:`~mtrl_jax.serving.protocol`.

    mtrl serve --model PATH [--lora-rank R --lora-alpha A] [--port P] [--slots N]

Concurrent requests are batched through one :class:`~mtrl_jax.rollout.jax_sampler.JaxSampler`
(its slots: rows of one KV cache); a decode call starts once requests have stopped arriving for
``--batch-quiet-ms`` (default 20; at most 1 s after the first, or when every slot has one):
the next turns of concurrent episodes arrive over tens of milliseconds, and a decode call costs
about the same for one request as for all slots. Requests on fresh slots that share 16 or more
leading tokens (a group's prompt) in one call have the common prefix encoded once.

Requests are stateless, as in vLLM; a request whose tokens extend what an idle slot holds (the
next turn of an episode) reuses that slot's cache, the way vLLM's prefix cache reuses blocks,
so a turn encodes only its new tokens. Slots are reused only for the same adapter (a cache
computed with other weights is not that adapter's). Idle slots are evicted least recently used.

LoRA adapters: ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` reads a PEFT adapter
folder (:func:`~mtrl_jax.models.checkpoint.export_peft_adapter`'s layout; rank, alpha and
targets must be the served model's, ``--lora-rank``/``--lora-alpha``/``--lora-targets``) and
registers it; a request names it in ``model``. ``unload`` removes it. The base model is served
under ``--served-model-name`` (default: the model folder's name) with the LoRA weights it
started with (fresh adapters: ``B = 0``, the base model's outputs).

Sampling: vLLM's ``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``stop_token_ids``.
A request's ``seed`` gives it its own random stream, as in vLLM: its tokens depend on the seed,
its token ids and the adapter, not on the requests it is batched with (up to float rounding of
batched matmuls); without a seed it draws from the server's stream. ``n`` must be 1.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from typing import Any

from mtrl_jax.models.decoding import SamplingParams
from mtrl_jax.rollout.jax_sampler import JaxSampler
from mtrl_jax.serving import protocol as P


class ModelServer:
    """The request handling, apart from HTTP (``app()`` wraps it in aiohttp)."""

    def __init__(self, model, *, model_name: str, slots: int = 64, max_len: int = 4096,
                 seed: int = 0, batch_wait_s: float = 0.005, batch_quiet_s: float = 0.02):
        from flax import nnx

        self.model = model
        self.model_name = model_name
        self.sampler = JaxSampler(model, SamplingParams(), slots=slots, max_len=max_len,
                                  seed=seed, batch_wait_s=batch_wait_s,
                                  batch_quiet_s=batch_quiet_s, batch_max_wait_s=1.0,
                                  # requests of any length and budget: few, wide programs
                                  # (each distinct pair compiles once, seconds on CPU)
                                  min_bucket=64, min_decode_steps=64,
                                  shared_prefix_min_tokens=16)
        if model.lora_config.rank > 0:
            base = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
            self.sampler.add_adapter(model_name, base, 0)
        self.adapter_paths: dict[str, str] = {}
        self.held: dict[str, tuple[str, list[int]]] = {}  # slot key -> (model, tokens it holds)
        self.idle: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU order
        self.in_flight: collections.Counter[str] = collections.Counter()  # per model name
        self._keys = itertools.count()
        self._slot_free: asyncio.Condition | None = None
        self.requests = 0
        self.started = time.time()

    # ------------------------------------------------------------------ endpoints

    def models(self) -> dict[str, Any]:
        cards = [{"id": self.model_name, "object": "model", "root": self.model_name,
                  "parent": None, "created": int(self.started), "owned_by": "mtrl_jax"}]
        for name in self.adapter_paths:
            cards.append({"id": name, "object": "model", "root": self.adapter_paths[name],
                          "parent": self.model_name, "created": int(self.started),
                          "owned_by": "mtrl_jax"})
        return {"object": "list", "data": cards}

    def load_lora(self, body: Any) -> str:
        from mtrl_jax.models.checkpoint import read_peft_adapter

        P.check(body, P.LOAD_LORA_REQUEST, "load_lora_adapter",
                required=("lora_name", "lora_path"))
        name, path = body["lora_name"], body["lora_path"]
        if name == self.model_name or name in self.adapter_paths:
            raise P.ProtocolError(f"The lora adapter '{name}' has already been loaded.")
        if self.model.lora_config.rank == 0:
            raise P.ProtocolError("this server has no LoRA slots (start it with --lora-rank)")
        if not os.path.isdir(path):
            raise P.ProtocolError(f"lora_path {path!r} is not a folder")
        pure = read_peft_adapter(self.model, path)
        version = _version_of(name)
        self.sampler.add_adapter(name, pure, version)
        self.adapter_paths[name] = path
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora(self, body: Any) -> str:
        P.check(body, P.UNLOAD_LORA_REQUEST, "unload_lora_adapter", required=("lora_name",))
        name = body["lora_name"]
        if name not in self.adapter_paths:
            raise KeyError(f"The lora adapter '{name}' cannot be found.")
        if self.in_flight[name]:
            raise P.ProtocolError(f"adapter {name!r} has {self.in_flight[name]} requests in "
                                  "flight")
        del self.adapter_paths[name]
        self.sampler.remove_adapter(name)
        for key in [k for k, (m, _) in self.held.items() if m == name and k in self.idle]:
            self._evict(key)
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def generate(self, body: Any) -> dict[str, Any]:
        P.check(body, P.GENERATE_REQUEST, "generate request", required=P.GENERATE_REQUEST_REQUIRED)
        sp = P.check(body["sampling_params"], P.SAMPLING_PARAMS, "sampling_params")
        tokens = P.check_token_ids(body["token_ids"], "generate request",
                                   self.model.cfg.vocab_size)
        name = body.get("model") or self.model_name
        if name != self.model_name and name not in self.adapter_paths:
            raise KeyError(f"The model `{name}` does not exist.")
        if sp.get("n", 1) != 1:
            raise P.ProtocolError("n must be 1")
        if body.get("stream"):
            raise P.ProtocolError("stream is not supported by mtrl serve")
        max_tokens = sp.get("max_tokens") or 16
        if max_tokens < 1:
            raise P.ProtocolError("max_tokens must be >= 1")
        top_k = sp.get("top_k") or 0
        # the budget travels with the request (the sampler's per-row max_new), not in the
        # parameters: requests that differ only in max_tokens share decode calls and programs
        params = SamplingParams(temperature=float(sp.get("temperature", 1.0)),
                                top_p=float(sp.get("top_p", 1.0)),
                                top_k=0 if top_k < 0 else int(top_k), max_tokens=1,
                                stop_token_ids=tuple(sp.get("stop_token_ids") or ()))
        adapter = name if self.sampler.adapters else None
        self.requests += 1
        self.in_flight[name] += 1
        try:
            key = await self._slot_for(name, tokens)
            try:
                res = await self.sampler.sample(key, tokens, max_tokens, params, adapter=adapter,
                                                seed=sp.get("seed"))
            except BaseException:
                self._evict(key)  # the slot's cache state is unknown
                raise
            self.held[key] = (name, tokens + res.tokens)
            self.idle[key] = None
            await self._notify()
        finally:
            self.in_flight[name] -= 1
        content = [{"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                   for t, lp in zip(res.tokens, res.logprobs, strict=True)]
        return {"request_id": body.get("request_id") or f"mtrl-{self.requests}",
                "choices": [{"index": 0, "token_ids": res.tokens,
                             "logprobs": {"content": content},
                             "finish_reason": res.finish_reason}]}

    # ------------------------------------------------------------------ slots

    async def _slot_for(self, name: str, tokens: list[int]) -> str:
        """An idle slot whose cache holds a prefix of ``tokens`` (the longest), else a fresh
        key once a slot is free (evicting the least recently used idle slot)."""
        best, best_len = None, 0
        for key in self.idle:
            model, held = self.held[key]
            n = len(held)
            if model == name and best_len < n < len(tokens) and tokens[:n] == held:
                best, best_len = key, n
        if best is not None:
            del self.idle[best]
            return best
        if self._slot_free is None:
            self._slot_free = asyncio.Condition()
        async with self._slot_free:
            while len(self.held) >= self.sampler.slots and not self.idle:
                await self._slot_free.wait()
        # no await from here on: the check and the claim are one step of the event loop
        if len(self.held) >= self.sampler.slots:
            self._evict(next(iter(self.idle)))
        key = f"s{next(self._keys)}"
        self.held[key] = (name, [])
        return key

    def _evict(self, key: str) -> None:
        self.idle.pop(key, None)
        self.held.pop(key, None)
        self.sampler.release(key)

    async def _notify(self) -> None:
        if self._slot_free is not None:
            async with self._slot_free:
                self._slot_free.notify_all()


def _version_of(name: str) -> int:
    """The policy version in an adapter name ending in ``-v<N>`` (``policy-v12`` -> 12), else
    -1: the version a sampled token records."""
    head, _, tail = name.rpartition("-v")
    return int(tail) if head and tail.isdigit() else -1


def app(server: ModelServer):
    """The aiohttp application: the endpoints of :mod:`~mtrl_jax.serving.protocol`."""
    from aiohttp import web

    def error(status: int, message: str, kind: str) -> web.Response:
        # vLLM's ErrorResponse shape: {"error": {"message", "type", "code"}}
        return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                            "code": status}}, status=status)

    async def body_of(request):
        try:
            return await request.json()
        except ValueError as e:
            raise P.ProtocolError(f"the body is not JSON: {e}") from e

    def handler(fn):
        async def wrapped(request):
            try:
                out = await fn(request)
            except P.ProtocolError as e:
                return error(400, str(e), "BadRequestError")
            except KeyError as e:
                return error(404, str(e.args[0]) if e.args else str(e), "NotFoundError")
            return out if isinstance(out, web.StreamResponse) else web.json_response(out)
        return wrapped

    async def generate(request):
        return await server.generate(await body_of(request))

    async def load(request):
        return web.Response(text=server.load_lora(await body_of(request)))

    async def unload(request):
        return web.Response(text=server.unload_lora(await body_of(request)))

    async def models(request):
        return server.models()

    async def health(request):
        return web.Response(status=200)

    async def on_cleanup(_app):
        await server.sampler.close()

    application = web.Application(client_max_size=64 * 2**20)
    application.router.add_post(P.GENERATE, handler(generate))
    application.router.add_post(P.LOAD_LORA, handler(load))
    application.router.add_post(P.UNLOAD_LORA, handler(unload))
    application.router.add_get(P.MODELS, handler(models))
    application.router.add_get(P.HEALTH, handler(health))
    application.on_cleanup.append(on_cleanup)
    return application


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, lora_rank: int = 0,
          lora_alpha: float | None = None, lora_targets: str | None = None, slots: int = 64,
          max_len: int = 4096, seed: int = 0, served_model_name: str | None = None,
          batch_quiet_ms: float = 20.0) -> None:
    """Load the model and serve until interrupted (SIGINT/SIGTERM)."""
    from aiohttp import web

    from mtrl_jax.models import LoRAConfig
    from mtrl_jax.models.checkpoint import load_model

    lora = None
    if lora_rank > 0:
        kw: dict[str, Any] = {"rank": lora_rank}
        if lora_alpha is not None:
            kw["alpha"] = lora_alpha
        if lora_targets:
            kw["targets"] = tuple(lora_targets.split(","))
        lora = LoRAConfig(**kw)
    model = load_model(model_path, lora=lora, seed=seed)
    name = served_model_name or os.path.basename(os.path.normpath(model_path))
    server = ModelServer(model, model_name=name, slots=slots, max_len=max_len, seed=seed,
                         batch_quiet_s=batch_quiet_ms / 1000)
    print(f"[mtrl serve] {name} on http://{host}:{port} ({slots} slots of {max_len} tokens, "
          f"LoRA rank {lora_rank})", flush=True)
    web.run_app(app(server), host=host, port=port, print=None, handle_signals=True)
