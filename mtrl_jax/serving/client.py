"""``rollout.backend: server``: the agent loop's sampler, backed by inference servers that
speak vLLM's API (:mod:`~mtrl_jax.serving.protocol`): a real ``vllm serve`` or ``mtrl serve``.

Each turn sends the episode's token ids (never re-tokenised text) to
``/inference/v1/generate`` and receives the sampled token ids with their log-probs. Requests go
to the server with the fewest outstanding requests. A server that refuses a connection, times
out or answers 5xx is taken out of rotation, and the turn is sent again to another one: the
request carries the whole episode, so a turn that ran on a dead server is simply rerun and
nothing is duplicated (an episode's turns are only recorded once their answer arrives). A
taken-out server is probed with ``/health`` every ``probe_interval_s`` and returns when it
answers. Retries are bounded (``retries`` attempts per turn), and every failure is counted.

LoRA versions: :meth:`ServerSampler.update_weights` writes the policy's adapters as a PEFT
folder (``<adapter_dir>/p<pid>-policy-v<N>``; the servers must read the same filesystem), loads
it on every server under that name and requests that name from then on; the sampled tokens
record version N. An older version is unloaded once no request of this sampler uses it. The
process id in the name keeps samplers of different processes (the trainer's evaluation, a
rollout worker) from unloading each other's adapters.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from typing import Any

from mtrl_jax.rollout.sampler import SampleResult
from mtrl_jax.serving import protocol as P


class ServerError(RuntimeError):
    pass


class ServerSampler:
    """Args:
      urls: the servers, ``http://host:port``.
      params: default sampling parameters (:class:`~mtrl_jax.models.decoding.SamplingParams`).
      model: the policy (its LoRA weights are exported on :meth:`update_weights`); None: the
        servers' base model only.
      base_model: the servers' served model name for requests before any adapter is loaded
        (default: the first name ``/v1/models`` lists).
      adapter_dir: where adapter folders are written (a folder every server can read).
      timeout_s: per request; retries: attempts per turn over all servers.
    """

    def __init__(self, urls: Sequence[str], params, *, model=None, base_model: str | None = None,
                 adapter_dir: str | None = None, timeout_s: float = 300.0, retries: int = 4,
                 probe_interval_s: float = 2.0, seed: int = 0):
        if not urls:
            raise ValueError("rollout.servers is empty: name at least one http://host:port")
        self.urls = [u.rstrip("/") for u in urls]
        self.params = params
        self.model = model
        self.adapter_dir = adapter_dir
        self.timeout_s = timeout_s
        self.retries = retries
        self.probe_interval_s = probe_interval_s
        self.seed = seed
        self._round_seed = seed & 0xFFFFFFFF
        self.policy_version = 0
        self.outstanding = collections.Counter({u: 0 for u in self.urls})
        self.down: dict[str, float] = {}  # url -> when it was taken out
        self.in_use: collections.Counter[str] = collections.Counter()  # adapter -> requests
        self.loaded: list[str] = []  # adapter names loaded on the servers, oldest first
        self.requests = 0
        self.failures = collections.Counter()  # url -> failed attempts
        self.retried = 0
        self.turns: collections.Counter[str] = collections.Counter()  # episode -> turns sent
        self._session = None
        self._session_loop = None
        self.base_model = base_model or self._first_model()
        self.adapter = self.base_model

    # ------------------------------------------------------------------ sampler interface

    async def sample(self, episode_id: str, tokens: Sequence[int], max_tokens: int,
                     params=None) -> SampleResult:
        p = params or self.params
        adapter, version = self.adapter, self.policy_version
        turn = self.turns[episode_id]
        self.turns[episode_id] += 1
        sp: dict[str, Any] = {"n": 1, "max_tokens": int(max_tokens),
                              "temperature": float(p.temperature), "top_p": float(p.top_p),
                              "top_k": int(p.top_k) if p.top_k else -1, "logprobs": 0,
                              "stop_token_ids": list(p.stop_token_ids or ()),
                              "skip_special_tokens": False,
                              "seed": self.request_seed(episode_id, turn)}
        body = {"request_id": f"{episode_id}/t{turn}", "model": adapter,
                "token_ids": [int(t) for t in tokens], "sampling_params": sp}
        self.in_use[adapter] += 1
        try:
            out = await self._post_generate(body)
        finally:
            self.in_use[adapter] -= 1
        choice = P.check_generate_response(out)["choices"][0]
        return SampleResult([int(t) for t in choice["token_ids"]],
                            [float(e["logprob"]) for e in choice["logprobs"]["content"]],
                            choice["finish_reason"], version)

    def release(self, episode_id: str) -> None:
        self.turns.pop(episode_id, None)

    def request_seed(self, episode_id: str, turn: int) -> int:
        """The ``seed`` of an episode's turn: a function of the round's key (the run's seed and
        step, see :meth:`begin_round`), the episode id and the turn, so the same run samples
        the same tokens whichever server answers, with whichever others batched, also when a
        turn is retried on another server."""
        return zlib.crc32(f"{episode_id}/t{turn}".encode(), self._round_seed) & 0x7FFFFFFF

    def begin_round(self, episode_ids, key=None) -> None:
        """Lockstep rounds are an in-process notion (a server batches as requests arrive);
        the round's key seeds its requests (:meth:`request_seed`)."""
        if key is not None:
            import jax
            import numpy as np

            data = np.asarray(jax.random.key_data(key)).tobytes()
            self._round_seed = zlib.crc32(data, self.seed & 0xFFFFFFFF)

    def end_round(self) -> None:
        pass

    def update_weights(self, lora_state: Any, version: int) -> None:
        """Export the LoRA weights of ``version`` and load them on every live server."""
        from mtrl_jax.models.checkpoint import export_peft_adapter
        from mtrl_jax.rollout.jax_sampler import set_lora

        if self.model is None or self.adapter_dir is None:
            raise ServerError("update_weights needs the policy model and an adapter_dir")
        set_lora(self.model, lora_state)
        name = f"p{os.getpid()}-policy-v{version}"
        path = os.path.abspath(os.path.join(self.adapter_dir, name))
        export_peft_adapter(self.model, path)
        for url in self.live():
            try:
                self._post_sync(url, P.LOAD_LORA, {"lora_name": name, "lora_path": path})
            except ServerError as e:
                if "already been loaded" not in str(e):
                    self._take_out(url, e)
        if not self.live():
            raise ServerError(f"no server took adapter {name}: {self.down}")
        self.loaded.append(name)
        self.adapter, self.policy_version = name, version
        self._unload_unused()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def metrics(self) -> dict[str, float]:
        return {"rollout/server_requests": float(self.requests),
                "rollout/server_retries": float(self.retried),
                "rollout/server_failures": float(sum(self.failures.values())),
                "rollout/servers_live": float(len(self.live()))}

    # ------------------------------------------------------------------ internals

    def live(self) -> list[str]:
        return [u for u in self.urls if u not in self.down]

    def _take_out(self, url: str, why: Any) -> None:
        if url not in self.down:
            self.down[url] = time.monotonic()
            print(f"[mtrl] server {url} taken out: {why}", flush=True)

    def _probe(self) -> None:
        now = time.monotonic()
        for url, since in list(self.down.items()):
            if now - since < self.probe_interval_s:
                continue
            try:
                urllib.request.urlopen(url + P.HEALTH, timeout=2).read()
            except (OSError, urllib.error.URLError):
                self.down[url] = now
                continue
            # back: it must hold the current adapter before it takes requests
            try:
                if self.adapter != self.base_model:
                    path = os.path.abspath(os.path.join(self.adapter_dir, self.adapter))
                    self._post_sync(url, P.LOAD_LORA, {"lora_name": self.adapter,
                                                       "lora_path": path})
            except ServerError as e:
                if "already been loaded" not in str(e):
                    continue
            del self.down[url]
            print(f"[mtrl] server {url} back", flush=True)

    def _unload_unused(self) -> None:
        for name in list(self.loaded[:-1]):
            if self.in_use[name]:
                continue
            for url in self.live():
                try:
                    self._post_sync(url, P.UNLOAD_LORA, {"lora_name": name})
                except ServerError:
                    pass  # a server that restarted does not hold it
            self.loaded.remove(name)

    async def _post_generate(self, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self._session_loop = loop
        last: Any = None
        for attempt in range(self.retries):
            if self.down:
                self._probe()
            live = self.live()
            if not live:
                await asyncio.sleep(min(self.probe_interval_s, 1.0))
                last = last or "no live server"
                continue
            url = min(live, key=lambda u: self.outstanding[u])
            if attempt:
                self.retried += 1
            self.outstanding[url] += 1
            self.requests += 1
            try:
                async with self._session.post(url + P.GENERATE, json=body) as resp:
                    text = await resp.text()
                    if resp.status >= 500:
                        raise ServerError(f"HTTP {resp.status}: {text[:300]}")
                    if resp.status != 200:
                        # a bad request is ours, not the server's: no retry elsewhere
                        raise ValueError(f"{url}{P.GENERATE}: HTTP {resp.status}: {text[:500]}")
                    return json.loads(text)
            except (TimeoutError, aiohttp.ClientError, ServerError, OSError) as e:
                self.failures[url] += 1
                self._take_out(url, repr(e)[:200])
                last = e
            finally:
                self.outstanding[url] -= 1
        raise ServerError(f"turn {body['request_id']}: no server answered in {self.retries} "
                          f"attempts (last: {last!r})")

    def _post_sync(self, url: str, path: str, body: dict[str, Any]) -> str:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{url}{path}: HTTP {e.code}: {e.read().decode()[:300]}") from e
        except (OSError, urllib.error.URLError) as e:
            raise ServerError(f"{url}{path}: {e!r}") from e

    def _first_model(self) -> str:
        last = None
        for url in self.urls:
            try:
                with urllib.request.urlopen(url + P.MODELS, timeout=10) as resp:
                    listing = P.check(json.loads(resp.read()), P.MODEL_LIST, "models")
                cards = [P.check(c, P.MODEL_CARD, "model card") for c in listing["data"]]
                base = [c["id"] for c in cards if not c.get("parent")]
                if base:
                    return base[0]
            except (OSError, urllib.error.URLError, ValueError) as e:
                last = e
                self._take_out(url, repr(e)[:200])
        raise ServerError(f"no server listed a model ({self.urls}): {last!r}")
