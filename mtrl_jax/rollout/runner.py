"""The rollout side of a training run: sampler, agent loops and environments of one policy.

The synchronous trainer and an asynchronous rollout worker run the same
:meth:`RolloutRunner.rollout_step` -- one lockstep round of ``batch_size x group_size``
episodes with the step's key -- so a worker at ``max_steps_off_policy = 0`` produces exactly
the trajectories the synchronous trainer would.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.families import make_env as family_env
from mtrl_jax.envs.scoring import strict_score
from mtrl_jax.models.accelerator import resolve_attention, resolve_dtype
from mtrl_jax.models.checkpoint import load_model
from mtrl_jax.models.config import ModelConfig
from mtrl_jax.models.decoding import SamplingParams
from mtrl_jax.models.lora import LoRAConfig
from mtrl_jax.models.tokenizer import build_byte_tokenizer, load_tokenizer
from mtrl_jax.models.transformer import CausalLM
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.jax_sampler import JaxSampler
from mtrl_jax.rollout.trajectory import Trajectory


def build_policy(config):
    """``(tokenizer, model)`` of a run's config with fresh LoRA adapters (``B = 0``: the base
    policy). Deterministic: a rollout worker rebuilds the same base from the config."""
    m, lo = config.model, config.lora
    lora = LoRAConfig(rank=lo.lora_rank, alpha=lo.lora_alpha, targets=tuple(lo.targets))
    numerics = dict(dtype=resolve_dtype(m.dtype), param_dtype=resolve_dtype(m.param_dtype),
                    attention=resolve_attention(m.attention))
    if m.path is not None:
        tokenizer = load_tokenizer(m.path)
        model = load_model(m.path, lora=lora, seed=config.seed, **numerics)
        return tokenizer, model
    if m.tokenizer != "byte":
        raise ValueError(f"model.tokenizer={m.tokenizer!r} needs model.path (a checkpoint "
                         "directory holding that tokenizer, e.g. the demo's warm-up output)")
    tokenizer = build_byte_tokenizer()
    cfg = ModelConfig(**{"model_type": "qwen2", "vocab_size": len(tokenizer),
                         "max_position_embeddings": 4096, **numerics, **m.tiny})
    model = CausalLM(cfg, lora, rngs=nnx.Rngs(config.seed))
    return tokenizer, model


def base_fingerprint(model) -> float:
    """A cheap checksum of the frozen base weights (sum of |w| over every leaf, in f32 per leaf,
    added in f64): a rollout worker compares it with the trainer's to prove both hold the same
    base before only LoRA weights travel between them."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return float(sum(float(jnp.sum(jnp.abs(x.astype(jnp.float32))))
                     for x in jax.tree.leaves(state)))


class _ToolLatency(Environment):
    """Adds a fixed delay to every tool call (benchmarks: simulated remote tools)."""

    def __init__(self, env: Environment, seconds: float):
        self._env = env
        self._seconds = seconds

    def __getattr__(self, name):
        return getattr(self._env, name)

    async def setup(self, task):
        return await self._env.setup(task)

    def tools(self):
        return self._env.tools()

    async def call_tool(self, call):
        await asyncio.sleep(self._seconds)
        return await self._env.call_tool(call)

    def reward(self, episode):
        return self._env.reward(episode)

    async def teardown(self):
        return await self._env.teardown()


class RolloutRunner:
    """Plays episodes of one policy: the sampler (holding the policy's weights), one agent loop,
    and an environment per episode.

    Args:
      config: the run's :class:`~mtrl_jax.config.TrainConfig`.
      tokenizer, model: the policy; the sampler decodes with ``model`` and :meth:`load_weights`
        replaces its LoRA weights.
      make_env: ``make_env(task) -> Environment`` (default: the task family's, with the
        recipe's ``data.reward`` kind).
    """

    def __init__(self, config, tokenizer, model, make_env: Callable[[Task], Environment] | None
                 = None):
        self.config = config
        r = config.rollout
        self.tokenizer = tokenizer
        self.make_env = make_env
        self.stop_token_ids = (tokenizer.eos_token_id,)
        #: sampling of training rollouts; evaluation passes its own (:meth:`sampling`)
        self.train_sampling = self.sampling(r.temperature, r.sampling_max_tokens)
        self.slots = r.batch_size * r.group_size
        if r.backend == "server":
            from mtrl_jax.serving.client import ServerSampler

            self.sampler = ServerSampler(
                r.servers, self.train_sampling, model=model, timeout_s=r.server_timeout_s,
                adapter_dir=os.path.join(config.output_dir, "served_adapters"),
                seed=config.seed)
        else:
            self.sampler = JaxSampler(model, self.train_sampling, slots=self.slots,
                                      max_len=r.max_context_tokens, seed=config.seed,
                                      shared_prefix_min_tokens=r.shared_prefix_min_tokens)
        self.loop = AgentLoop(tokenizer, self.sampler, AgentLoopConfig.from_rollout(r))
        self.step_metrics: dict[str, float] = {}
        self._aloop = asyncio.new_event_loop()

    def sampling(self, temperature: float, max_tokens: int) -> SamplingParams:
        """The recipe's sampling (top-p, top-k, stop token) at ``temperature``, with a per-turn
        budget of ``max_tokens``."""
        r = self.config.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                              max_tokens=max_tokens, stop_token_ids=self.stop_token_ids)

    @property
    def policy_version(self) -> int:
        return self.sampler.policy_version

    def load_weights(self, lora, version: int) -> None:
        """The policy's LoRA weights (an ``nnx.State`` or pure dict) of ``version``."""
        self.sampler.update_weights(lora, version)

    def env(self, task: Task) -> Environment:
        if self.make_env is not None:
            env = self.make_env(task)
        else:
            env = family_env(task, self.config.data.reward)
        latency = self.config.rollout.simulated_tool_latency_s
        return _ToolLatency(env, latency) if latency > 0 else env

    def run_episodes(self, tasks: Sequence[Task], n: int, key: jax.Array, *,
                     sampling: SamplingParams | None = None, tag: str = "ep",
                     progress: Callable[[int, int], None] | None = None) -> list[Trajectory]:
        """``n`` episodes per task sampled with ``sampling`` (default: the training
        rollouts'), in lockstep rounds of at most ``slots`` episodes; trajectories in task-major
        order with ``strict_score`` filled in. ``progress(done, total)`` after each round."""
        sampling = sampling or self.train_sampling
        jobs = [(t, k) for t in tasks for k in range(n)]
        out: list[Trajectory] = []
        for r0 in range(0, len(jobs), self.slots):
            chunk = jobs[r0:r0 + self.slots]
            ids = [f"{tag}/{t.id}#{k}" for t, k in chunk]
            self.sampler.begin_round(ids, jax.random.fold_in(key, r0))
            try:
                async def go(chunk=chunk, ids=ids):
                    return await asyncio.gather(*(
                        self.loop.run(self.env(t), t, episode_id=e, group_id=t.id,
                                      sampling=sampling)
                        for (t, _), e in zip(chunk, ids, strict=True)))

                out += self._aloop.run_until_complete(go())
            finally:
                self.sampler.end_round()
            if progress is not None:
                progress(len(out), len(jobs))
        for traj, (t, _) in zip(out, jobs, strict=True):
            if t.expected:
                traj.strict_score = strict_score(traj.final_text, t.expected)
        return out

    def rollout_step(self, step: int, tasks: Sequence[Task]) -> list[Trajectory]:
        """The rollout of training step ``step``: ``group_size`` episodes per task with the
        step's key (``fold_in(key(seed), step)``), task-major."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), step)
        s = self.sampler
        names = ("prefill_tokens_saved", "prefill_tokens", "decode_seconds",
                 "decode_slot_steps", "sampled_tokens")
        before = {n: getattr(s, n, 0) for n in names}
        t0 = time.perf_counter()
        trajs = self.run_episodes(tasks, self.config.rollout.group_size, key, tag=f"s{step}")
        wall = time.perf_counter() - t0
        d = {n: getattr(s, n, 0) - before[n] for n in names}
        #: the last rollout step's sampler metrics (every rollout source reports them)
        self.step_metrics = {
            # the share of input tokens that a shared prompt prefill did not encode
            "rollout/prefill_saved_frac":
                d["prefill_tokens_saved"] / max(1, d["prefill_tokens_saved"] + d["prefill_tokens"])}
        if hasattr(s, "decode_seconds"):
            self.step_metrics.update({
                # where a rollout's time goes: in the model's decode calls, or elsewhere (the
                # agent loop, tools, rewards, waiting for a round's last episode)
                "time/rollout_decode_s": d["decode_seconds"],
                "time/rollout_outside_decode_s": max(0.0, wall - d["decode_seconds"]),
                # the share of the decode calls' slot-steps that sampled a token (the rest: free
                # slots and finished episodes riding along in the fixed batch)
                "rollout/decode_slot_use": d["sampled_tokens"] / max(1, d["decode_slot_steps"])})
        if hasattr(s, "metrics"):  # inference servers: requests, retries, failures, live servers
            now = s.metrics()
            last = getattr(self, "_server_metrics", {})
            self.step_metrics.update({k: v - last.get(k, 0.0) if k != "rollout/servers_live"
                                      else v for k, v in now.items()})
            self._server_metrics = now
        return trajs

    def close(self) -> None:
        if self._aloop.is_closed():
            return
        try:
            # episodes a signal interrupted are still tasks of the loop: cancel them first, and
            # let the interrupt they re-raise here pass (the run is already ending because of it)
            leftover = [t for t in asyncio.all_tasks(self._aloop) if not t.done()]
            for t in leftover:
                t.cancel()
            try:
                if leftover:
                    self._aloop.run_until_complete(
                        asyncio.gather(*leftover, return_exceptions=True))
            except KeyboardInterrupt:
                pass
            self._aloop.run_until_complete(self.sampler.close())
        finally:
            self._aloop.close()
