"""The embedded JAX sampler: many concurrent episodes share one batched KV-cache decoder.

Each episode holds a *slot* (a row of the KV cache) from its first request until ``release``.
On a request the sampler feeds only the episode's tokens that the slot does not hold yet (the
prompt on turn 1; the last sampled token plus the tool results afterwards) and samples the turn.
Requests that arrive together are served by one batched
:func:`~mtrl_jax.models.decoding.generate` call over all slots (rows without a request are idle
for that call). Decoding runs in a worker thread, so tools keep running meanwhile.

Shapes are static per (input bucket, new-token bucket): inputs are padded to a power of two
and ``max_new_tokens`` to a power of two, so a run compiles a handful of programs.

Lockstep rounds (``begin_round(n, key)`` ... ``end_round()``): a decode call waits until every
episode of the round that is still running has a request in, so the batches -- and with the
round's key, the sampled tokens -- do not depend on timing. The synchronous trainer runs its
rollouts this way, which makes a run (and a resumed run) reproducible.

``update_weights(lora_state, version)`` swaps the LoRA adapters between calls; later turns of
an episode then carry the new version (partial rollouts), recorded per turn in
``SampleResult.policy_version``.

Named adapters (a server holding several policy versions at once, :mod:`mtrl_jax.serving`):
``add_adapter(name, lora_state, version)`` registers one, and ``sample(..., adapter=name)``
decodes with it. A decode call serves one adapter (like one set of sampling parameters); the
weights are swapped in before the call that needs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtrl_jax.models.decoding import SamplingParams, bucket_length, generate, prefill_shared
from mtrl_jax.models.transformer import CausalLM, init_cache
from mtrl_jax.rollout.sampler import SampleResult


def set_lora(model: CausalLM, lora_state: Any) -> None:
    """Load LoRA parameters (an ``nnx.State`` or its pure dict) into ``model`` in place."""
    state = nnx.state(model, nnx.LoRAParam)
    if isinstance(lora_state, dict):
        nnx.replace_by_pure_dict(state, lora_state)
    else:
        state = lora_state
    nnx.update(model, state)


@dataclasses.dataclass
class _Request:
    slot: int
    new_tokens: list[int]
    max_tokens: int
    params: SamplingParams
    future: asyncio.Future
    adapter: str | None = None
    seed: int | None = None


class JaxSampler:
    """Args:
      model: the policy (:class:`~mtrl_jax.models.transformer.CausalLM`).
      params: sampling parameters (``max_tokens`` is overridden per request).
      slots: concurrent episodes held in the cache (the batch size of every decode call).
      max_len: cache length per slot (the episode's context limit).
      seed: PRNG seed; each call folds in a counter, so runs are reproducible for the same
        sequence of calls.
      batch_wait_s: how long the batcher waits for more requests before a call.
      min_bucket, min_decode_steps: the smallest input width and decode-loop bound of a call
        (both rounded up to powers of two: each distinct pair is a compiled program; the loop
        stops when every row is done, so a larger bound costs no decode steps).
      batch_quiet_s: outside lockstep rounds (a server's requests), also wait until no request
        has arrived for this long (at most ``batch_max_wait_s`` in all, or until every slot
        has a request): the turns of concurrent episodes trickle in over tens of milliseconds,
        and a decode call costs the same for one request as for all slots. 0 = off.
      shared_prefix_min_tokens: episodes that start in one decode call on empty slots with at
        least this many equal tokens (a group's prompt) get that prefix encoded once and its
        cache copied to each slot (:func:`~mtrl_jax.models.decoding.prefill_shared`); each keeps
        at least its last input token to feed itself. 0 = every slot encodes its own input.
    """

    def __init__(self, model: CausalLM, params: SamplingParams, *, slots: int = 32,
                 max_len: int = 4096, seed: int = 0, batch_wait_s: float = 0.002,
                 batch_quiet_s: float = 0.0, batch_max_wait_s: float = 0.25,
                 min_bucket: int = 16, min_decode_steps: int = 8, policy_version: int = 0,
                 shared_prefix_min_tokens: int = 16):
        self.model = model
        self.params = params
        self.slots = slots
        self.max_len = max_len
        self.batch_wait_s = batch_wait_s
        self.batch_quiet_s = batch_quiet_s
        self.batch_max_wait_s = batch_max_wait_s
        self._last_arrival = 0.0
        self.min_bucket = min_bucket
        self.min_decode_steps = min_decode_steps
        self.policy_version = policy_version
        self.shared_prefix_min_tokens = shared_prefix_min_tokens
        #: input tokens not encoded thanks to shared prefixes, and those encoded (a counter each)
        self.prefill_tokens_saved = 0
        self.prefill_tokens = 0
        #: seconds spent in decode calls (prefill + sampling, host transfers included), the
        #: decode steps they ran times ``slots`` (the work a fixed-batch call computes), and the
        #: tokens actually sampled (counters; where a rollout's time goes)
        self.decode_seconds = 0.0
        self.decode_slot_steps = 0
        self.sampled_tokens = 0
        # called on the decode thread before every decode call (a rollout worker's partial
        # rollouts load newer weights there; the turns that follow carry the new version)
        self.before_decode = None
        self.key = jax.random.key(seed)
        self.calls = 0
        self.cache = init_cache(model.cfg, slots, max_len)
        self.slot_of: dict[str, int] = {}
        self.fed: list[list[int]] = [[] for _ in range(slots)]  # tokens each slot's cache holds
        self.free = list(range(slots))[::-1]
        self.pending: list[_Request] = []
        self._reset: set[int] = set()  # slots to empty before the next decode call
        self._slot_freed: asyncio.Condition | None = None
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._round: int | None = None  # episodes in the current lockstep round
        self._round_done: set[str] = set()
        #: named adapters: name -> (LoRA state or pure dict, version); the one loaded now
        self.adapters: dict[str, tuple[Any, int]] = {}
        self.active_adapter: str | None = None

    # ------------------------------------------------------------------ public API

    def begin_round(self, episode_ids: Sequence[str], key: jax.Array | None = None) -> None:
        """Start a lockstep round of these episodes (see the module docstring): episode ``i``
        gets slot ``i``; ``key`` resets the sampling key and the call counter."""
        episode_ids = list(episode_ids)
        if len(episode_ids) > self.slots:
            raise ValueError(f"a lockstep round of {len(episode_ids)} episodes needs as many "
                             f"slots (the sampler has {self.slots})")
        if self.slot_of:
            raise RuntimeError(f"begin_round: {len(self.slot_of)} episode(s) still hold slots")
        self._round = len(episode_ids)
        self._round_done = set()
        self.slot_of = {e: i for i, e in enumerate(episode_ids)}
        self.free = list(range(len(episode_ids), self.slots))[::-1]
        for i in range(len(episode_ids)):
            self.fed[i] = []
            self._reset.add(i)
        if key is not None:
            self.key = key
            self.calls = 0

    def end_round(self) -> None:
        self._round = None
        self._round_done = set()

    async def sample(self, episode_id: str, tokens: Sequence[int], max_tokens: int,
                     params: SamplingParams | None = None, *,
                     adapter: str | None = None, seed: int | None = None) -> SampleResult:
        """Continue the episode by at most ``max_tokens`` tokens sampled with ``params``
        (default: the sampler's). Requests with different parameters are served by different
        decode calls. ``adapter``: a name given to :meth:`add_adapter` (None: the weights the
        model holds). ``seed``: this request's own random stream (its samples then depend on
        the seed, the tokens and the weights, not on the other requests of its decode call;
        see :func:`~mtrl_jax.models.decoding.generate`'s ``row_seeds``)."""
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"no adapter named {adapter!r} (loaded: {sorted(self.adapters)})")
        self._ensure_worker()
        slot = await self._acquire(episode_id)
        held = self.fed[slot]
        tokens = list(tokens)
        if tokens[:len(held)] != held:
            # the episode's history differs from what the cache holds (e.g. a new sample after a
            # template rewrite): re-encode it from scratch in this slot
            self.fed[slot] = held = []
            self._reset.add(slot)
        new = tokens[len(held):]
        if not new:
            raise ValueError(f"episode {episode_id}: no new tokens to feed (the loop must pass "
                             "the whole episode including the last sampled token)")
        room = self.max_len - len(tokens)
        if room <= 0:
            return SampleResult([], [], "length", self.policy_version)
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(_Request(slot, new, min(max_tokens, room), params or self.params,
                                     fut, adapter, seed))
        self._last_arrival = time.monotonic()
        self._wake.set()
        return await fut

    def release(self, episode_id: str) -> None:
        if self._round is not None:
            self._round_done.add(episode_id)
            if self._wake is not None:
                self._wake.set()  # the round may now be complete
        slot = self.slot_of.pop(episode_id, None)
        if slot is None:
            return
        self.fed[slot] = []
        self._reset.add(slot)  # applied by the decode thread, the only user of the cache
        self.free.append(slot)
        if self._slot_freed is not None:
            cond = self._slot_freed

            async def notify():
                async with cond:
                    cond.notify()

            asyncio.get_running_loop().create_task(notify())

    def update_weights(self, lora_state: Any, version: int) -> None:
        """Load new LoRA parameters (an ``nnx.State`` or pure dict) and bump the version."""
        set_lora(self.model, lora_state)
        self.policy_version = version
        self.active_adapter = None

    def add_adapter(self, name: str, lora_state: Any, version: int) -> None:
        """Register LoRA weights (an ``nnx.State`` or pure dict) under ``name``."""
        self.adapters[name] = (lora_state, version)

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    # ------------------------------------------------------------------ internals

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._slot_freed = asyncio.Condition()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _acquire(self, episode_id: str) -> int:
        if episode_id in self.slot_of:
            return self.slot_of[episode_id]
        async with self._slot_freed:
            while not self.free:
                await self._slot_freed.wait()
            slot = self.free.pop()
        self.slot_of[episode_id] = slot
        return slot

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join the call
            if self.batch_quiet_s > 0 and self._round is None:
                t0 = time.monotonic()
                while (len(self.pending) < self.slots
                       and time.monotonic() - self._last_arrival < self.batch_quiet_s
                       and time.monotonic() - t0 < self.batch_max_wait_s):
                    await asyncio.sleep(self.batch_quiet_s / 4)
            self._wake.clear()
            if self._round is not None and \
                    len(self.pending) < self._round - len(self._round_done):
                continue  # lockstep: wait for every running episode of the round
            if not self.pending:
                continue
            # one decode call samples with one set of parameters (and one adapter): serve the
            # oldest request's and leave the others for the next call
            want = (self.pending[0].params, self.pending[0].adapter)
            batch = [r for r in self.pending if (r.params, r.adapter) == want]
            self.pending = [r for r in self.pending if (r.params, r.adapter) != want]
            if self.pending:
                self._wake.set()
            try:
                results = await asyncio.to_thread(self._decode, batch)
            except Exception as e:
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            for req, res in zip(batch, results, strict=True):
                if not req.future.done():
                    req.future.set_result(res)

    def _decode(self, batch: list[_Request]) -> list[SampleResult]:
        t0 = time.perf_counter()
        try:
            return self._decode_timed(batch)
        finally:
            self.decode_seconds += time.perf_counter() - t0

    def _decode_timed(self, batch: list[_Request]) -> list[SampleResult]:
        if self.before_decode is not None:
            self.before_decode()
        name = batch[0].adapter
        if name is not None and name != self.active_adapter:
            lora, version = self.adapters[name]
            self.update_weights(lora, version)
            self.active_adapter = name
        if self._reset:
            reset, self._reset = sorted(self._reset), set()
            self.cache = self.cache._replace(
                lengths=self.cache.lengths.at[jnp.asarray(reset)].set(0))
        if self.shared_prefix_min_tokens > 0:
            self._share_prefixes(batch)
        self.prefill_tokens += sum(len(r.new_tokens) for r in batch)
        width = bucket_length(max(len(r.new_tokens) for r in batch), self.min_bucket)
        inputs = np.zeros((self.slots, width), np.int32)
        num_inputs = np.zeros((self.slots,), np.int32)
        max_new = np.zeros((self.slots,), np.int32)
        for r in batch:
            inputs[r.slot, :len(r.new_tokens)] = r.new_tokens
            num_inputs[r.slot] = len(r.new_tokens)
            max_new[r.slot] = r.max_tokens
        steps = bucket_length(int(max_new.max()), self.min_decode_steps)
        key = jax.random.fold_in(self.key, self.calls)
        self.calls += 1
        row_seeds = None
        if any(r.seed is not None for r in batch):
            row_seeds = [None] * self.slots
            for r in batch:
                row_seeds[r.slot] = r.seed
        out = generate(self.model, self.cache, jnp.asarray(inputs), jnp.asarray(num_inputs), key,
                       batch[0].params, max_new=jnp.asarray(max_new), max_new_tokens=steps,
                       row_seeds=row_seeds)
        self.cache = out.cache
        toks = np.asarray(out.tokens)
        lps = np.asarray(out.logprobs)
        counts = np.asarray(out.num_tokens)
        stopped = np.asarray(out.stopped)
        self.decode_slot_steps += steps * self.slots
        self.sampled_tokens += int(sum(counts[r.slot] for r in batch))
        results = []
        for r in batch:
            n = int(counts[r.slot])
            sampled = toks[r.slot, :n].tolist()
            # the cache now holds the inputs and all sampled tokens but the last
            self.fed[r.slot] = self.fed[r.slot] + r.new_tokens + sampled[:-1]
            results.append(SampleResult(sampled, lps[r.slot, :n].tolist(),
                                        "stop" if stopped[r.slot] else "length",
                                        self.policy_version))
        return results

    def _share_prefixes(self, batch: list[_Request]) -> None:
        """Requests on empty slots whose inputs start with the same tokens (at least
        ``shared_prefix_min_tokens``): encode the common prefix once per cluster, copy it into
        their slots, and leave each request the rest of its input (at least one token)."""
        fresh = [r for r in batch if not self.fed[r.slot]
                 and len(r.new_tokens) > self.shared_prefix_min_tokens]
        if len(fresh) < 2:
            return
        fresh.sort(key=lambda r: r.new_tokens)
        clusters: list[tuple[list[_Request], int]] = []
        members, shared = [fresh[0]], 0
        for prev, r in itertools.pairwise(fresh):
            a, b = prev.new_tokens, r.new_tokens
            n = min(len(a), len(b)) - 1  # each keeps its last input token
            common = next((i for i in range(n) if a[i] != b[i]), n)
            if len(members) == 1 and common >= self.shared_prefix_min_tokens:
                members.append(r)
                shared = common
            elif len(members) > 1 and common >= shared:
                members.append(r)
            else:
                if len(members) > 1:
                    clusters.append((members, shared))
                members, shared = [r], 0
        if len(members) > 1:
            clusters.append((members, shared))
        if not clusters:
            return
        u = bucket_length(len(clusters), 1)
        p = min(bucket_length(max(s for _, s in clusters), self.min_bucket), self.max_len)
        prefixes = np.zeros((u, p), np.int32)
        lengths = np.zeros((u,), np.int32)
        src = np.zeros((self.slots,), np.int32)
        take = np.zeros((self.slots,), bool)
        for c, (members, shared) in enumerate(clusters):
            prefixes[c, :shared] = members[0].new_tokens[:shared]
            lengths[c] = shared
            for r in members:
                src[r.slot], take[r.slot] = c, True
                self.fed[r.slot] = r.new_tokens[:shared]
                r.new_tokens = r.new_tokens[shared:]
            self.prefill_tokens_saved += (len(members) - 1) * shared
            self.prefill_tokens += shared
        self.cache = prefill_shared(self.model, self.cache, prefixes, lengths, src, take)
