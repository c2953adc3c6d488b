"""The JAX sampler inside the agent loop: batched slots, cache reuse across turns, and
behaviour log-probs equal to a full forward of the finished episode."""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtrl_jax.envs.base import FunctionEnvironment, Task
from mtrl_jax.envs.tools import tool
from mtrl_jax.models import CausalLM, LoRAConfig, ModelConfig
from mtrl_jax.models.decoding import SamplingParams, _generate_jit
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.jax_sampler import JaxSampler

TOK = build_byte_tokenizer()
IM_END = TOK.convert_tokens_to_ids("<|im_end|>")
CFG = ModelConfig(model_type="qwen2", vocab_size=len(TOK), hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@tool
def echo(text: str) -> str:
    """Echo the text back."""
    return text


def episode_logprobs(model, tokens):
    """A full forward of ``tokens``; padded at the end to a multiple of 256 (causal: later
    tokens change nothing before them) so that episodes of many lengths share a few programs."""
    n = len(tokens)
    length = -(-n // 256) * 256
    t = jnp.asarray(list(tokens) + [0] * (length - n), jnp.int32)[None]
    return np.asarray(token_logprobs(model, t, jnp.arange(length)[None],
                                     jnp.ones((1, length), jnp.int32)).logprobs[0])[:n]


def test_sampler_in_the_loop_matches_full_forward():
    model = CausalLM(CFG, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    # a policy that often emits the stop token and the tool-call tag, so episodes end and
    # sometimes call tools: bias the LM head towards those tokens
    head = model.lm_head[...]
    model.lm_head[...] = head.at[:, IM_END].add(0.5 * jnp.sign(head[:, IM_END] + 1e-3))
    sampler = JaxSampler(model, SamplingParams(temperature=1.0, stop_token_ids=(IM_END,)),
                         slots=4, max_len=1024, seed=0)
    loop = AgentLoop(TOK, sampler, AgentLoopConfig(max_turns=3, sampling_max_tokens=24,
                                                   max_context_tokens=1024))
    tasks = [Task(id=f"t{i}", family="test", name="echo", prompt=f"say {i}") for i in range(6)]
    env = lambda t: FunctionEnvironment([echo], lambda ep: ep.update_reward(0.0))
    before = _generate_jit._cache_size()
    trajs = asyncio.run(loop.run_many(env, tasks, group_size=2, concurrency=12))
    assert len(trajs) == 12 and all(t.error is None for t in trajs), [t.error for t in trajs]
    assert sampler.calls >= 2 and not sampler.slot_of and len(sampler.free) == 4
    for traj in trajs:
        s = traj.samples[0]
        mask = np.asarray(s.loss_mask, bool)
        assert mask.sum() > 0
        full = episode_logprobs(model, s.tokens)
        np.testing.assert_allclose(np.asarray(s.logprobs)[mask], full[mask], atol=5e-4)
    # a few static shapes, not one program per call
    assert _generate_jit._cache_size() - before <= 6


def test_multi_turn_continuation_reuses_the_slot_and_matches_full_forward():
    model = CausalLM(CFG, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    sampler = JaxSampler(model, SamplingParams(temperature=1.0), slots=2, max_len=512, seed=3)
    rng = np.random.default_rng(0)

    async def episode(k):
        tokens = rng.integers(0, 256, 5 + 7 * k).tolist()
        sampled_at = []
        for _ in range(3):  # three turns, tool results appended in between
            res = await sampler.sample(f"ep{k}", tokens, 6)
            sampled_at.append((len(tokens), res.logprobs))
            tokens = tokens + res.tokens + rng.integers(0, 256, 4).tolist()
        sampler.release(f"ep{k}")
        return tokens, sampled_at

    async def main():
        out = await asyncio.gather(*(episode(k) for k in range(3)))  # 3 episodes, 2 slots
        await sampler.close()
        return out

    for tokens, sampled_at in asyncio.run(main()):
        full = episode_logprobs(model, tokens)
        for start, lps in sampled_at:
            np.testing.assert_allclose(lps, full[start:start + len(lps)], atol=5e-4)
    # each slot held only the unseen suffix each turn: at most ~3 decode calls per round
    assert sampler.calls <= 9


def test_weights_loaded_before_a_decode_call_apply_to_later_turns():
    """Partial rollouts: weights swapped between two turns of one episode; the second turn
    records the new version and samples from the new adapters (cached KV of earlier tokens is
    kept, as in-flight weight updates do)."""
    import jax

    def run(swap: bool):
        model = CausalLM(CFG, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
        lora = nnx.state(model, nnx.LoRAParam).to_pure_dict()
        new = jax.tree.map(lambda x: np.asarray(x) + 0.5, lora)
        sampler = JaxSampler(model, SamplingParams(temperature=1.0, stop_token_ids=(IM_END,)),
                             slots=2, max_len=256, seed=0)
        calls = []

        def hook():
            calls.append(sampler.policy_version)
            if swap and len(calls) == 2:
                sampler.update_weights(new, 1)

        sampler.before_decode = hook
        prompt = TOK.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

        async def go():
            r1 = await sampler.sample("e", prompt, 8)
            more = prompt + r1.tokens + TOK.encode("\n<|im_start|>user\nagain<|im_end|>\n")
            r2 = await sampler.sample("e", more, 8)
            await sampler.close()
            return r1, r2

        return asyncio.run(go())

    (a1, a2), (b1, b2) = run(False), run(True)
    assert (a1.policy_version, a2.policy_version) == (0, 0)
    assert (b1.policy_version, b2.policy_version) == (0, 1)
    assert a1.logprobs == b1.logprobs  # the first turn is untouched
    assert a2.logprobs != b2.logprobs  # the second sampled from the new adapters


def test_each_request_samples_with_its_own_parameters(monkeypatch):
    """Sampling parameters travel with each request (evaluation's greedy and sampled episodes,
    training's): one decode call serves one parameter set, and nothing is swapped on the
    sampler."""
    from types import SimpleNamespace

    from mtrl_jax.rollout import jax_sampler

    seen = []

    def fake_generate(model, cache, inputs, num_inputs, key, params, *, max_new, max_new_tokens,
                      row_seeds=None):
        assert row_seeds is None  # no request carries a seed
        rows = np.asarray(num_inputs) > 0
        seen.append((params.temperature, int(rows.sum())))
        n = inputs.shape[0]
        return SimpleNamespace(cache=cache, tokens=jnp.full((n, 1), IM_END),
                               logprobs=jnp.zeros((n, 1)), num_tokens=jnp.ones((n,), jnp.int32),
                               stopped=jnp.ones((n,), bool))

    monkeypatch.setattr(jax_sampler, "generate", fake_generate)
    model = CausalLM(CFG, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    default = SamplingParams(temperature=0.7, stop_token_ids=(IM_END,))
    sampler = JaxSampler(model, default, slots=4, max_len=64, seed=0)
    greedy = SamplingParams(temperature=0.0, stop_token_ids=(IM_END,))

    async def go():
        got = await asyncio.gather(sampler.sample("a", [1, 2], 4, greedy),
                                   sampler.sample("b", [1, 3], 4),
                                   sampler.sample("c", [1, 4], 4, greedy))
        await sampler.close()
        return got

    out = asyncio.run(go())
    assert all(r.tokens == [IM_END] for r in out)
    assert sorted(seen) == [(0.0, 2), (0.7, 1)]  # two calls: the greedy pair, the default one
    assert sampler.params is default


def _lockstep_episodes(model, share: int, sampling: SamplingParams, group: int = 4):
    """Two tasks x ``group`` episodes in one lockstep round (as the trainer plays them)."""
    sampler = JaxSampler(model, sampling, slots=2 * group, max_len=1024, seed=0,
                         shared_prefix_min_tokens=share)
    loop = AgentLoop(TOK, sampler, AgentLoopConfig(max_turns=2, sampling_max_tokens=12,
                                                   max_context_tokens=1024))
    tasks = [Task(id=f"t{i}", family="test", name="echo",
                  prompt=f"say {i}, then call echo with the same words") for i in range(2)]
    env = lambda t: FunctionEnvironment([echo], lambda ep: ep.update_reward(0.0))
    ids = [f"{t.id}#{k}" for t in tasks for k in range(group)]
    sampler.begin_round(ids, jax.random.key(7))

    async def go():
        out = await asyncio.gather(*(loop.run(env(t), t, episode_id=f"{t.id}#{k}",
                                              group_id=t.id)
                                     for t in tasks for k in range(group)))
        await sampler.close()
        return out

    trajs = asyncio.run(go())
    sampler.end_round()
    return trajs, sampler


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prompt_prefill_gives_the_same_episodes(temperature):
    model = CausalLM(CFG, LoRAConfig(rank=2), rngs=nnx.Rngs(4))
    sampling = SamplingParams(temperature=temperature, stop_token_ids=(IM_END,))
    flat, s_flat = _lockstep_episodes(model, 0, sampling)
    shared, s_shared = _lockstep_episodes(model, 16, sampling)
    assert s_flat.prefill_tokens_saved == 0
    # each group's prompt encoded once instead of 4 times: 3 of 4 copies saved per task
    assert s_shared.prefill_tokens_saved >= 2 * 3 * 16
    assert s_shared.prefill_tokens + s_shared.prefill_tokens_saved == s_flat.prefill_tokens
    for a, b in zip(flat, shared, strict=True):
        assert a.samples[0].tokens == b.samples[0].tokens
        np.testing.assert_allclose(a.samples[0].logprobs, b.samples[0].logprobs, atol=1e-5)
        # and what was sampled matches a full forward of the episode
        mask = np.asarray(b.samples[0].loss_mask, bool)
        full = episode_logprobs(model, b.samples[0].tokens)
        np.testing.assert_allclose(np.asarray(b.samples[0].logprobs)[mask], full[mask],
                                   atol=5e-4)
    assert all(np.sum(t.samples[0].loss_mask) > 0 for t in shared)
    assert len({tuple(t.samples[0].tokens) for t in shared}) > 2 or temperature == 0.0


def test_a_seeded_request_samples_the_same_tokens_whatever_it_is_batched_with():
    """Per-request seeds (vLLM's ``seed``): a seeded request's tokens depend on its seed, its
    tokens and the weights only -- not on the sampler's key, its slot, or the other requests of
    the decode call; unseeded requests draw exactly as before."""
    from mtrl_jax.models.decoding import generate
    from mtrl_jax.models.transformer import init_cache

    model = CausalLM(CFG, None, rngs=nnx.Rngs(1))
    params = SamplingParams(temperature=1.0, max_tokens=12)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, 9).astype(np.int32) for _ in range(4)]

    def call(rows, key, seeds=None):
        inputs = np.stack(rows)
        out = generate(model, init_cache(CFG, len(rows), 64), jnp.asarray(inputs),
                       jnp.full((len(rows),), inputs.shape[1], jnp.int32), key, params,
                       row_seeds=seeds)
        return [np.asarray(out.tokens[i]).tolist() for i in range(len(rows))]

    k0, k1 = jax.random.key(0), jax.random.key(1)
    a = call(prompts, k0, [7, None, 9, None])
    # another call key, other companions, another slot: the seeded requests do not move
    b = call([prompts[2], prompts[3][::-1], prompts[0]], k1, [9, None, 7])
    assert b[0] == a[2] and b[2] == a[0]
    c = call([prompts[1], prompts[0]], k1, [None, 7])
    assert c[1] == a[0]
    # another seed samples otherwise; unseeded rows are exactly the call without seeds
    d = call(prompts, k0, [8, None, 9, None])
    assert d[0] != a[0] and d[2] == a[2]
    plain = call(prompts, k0)
    assert plain[1] == a[1] and plain[3] == a[3]
    assert plain[0] != a[0]  # (the seeded row left the call's stream)

    # through the sampler: sample(..., seed=) is the same stream
    sampler = JaxSampler(model, params, slots=3, max_len=64, seed=5)

    async def go():
        return await asyncio.gather(
            sampler.sample("x", prompts[1].tolist(), 12),
            sampler.sample("y", prompts[0].tolist(), 12, seed=7))

    _, y = asyncio.run(go())
    assert y.tokens == a[0][:len(y.tokens)] and len(y.tokens) == 12
