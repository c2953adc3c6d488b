"""rollout.backend: server against `mtrl serve` processes on 127.0.0.1: the protocol (vLLM's
field names and types), greedy episodes identical to the in-process sampler's, LoRA versions
hot-loaded by name, a server killed mid-run, and no server outliving the test."""

import asyncio
import json
import os
import signal
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

from mtrl_jax.envs.base import FunctionEnvironment, Task
from mtrl_jax.envs.tools import tool
from mtrl_jax.models import CausalLM, LoRAConfig, ModelConfig
from mtrl_jax.models.checkpoint import load_model, save_model
from mtrl_jax.models.decoding import SamplingParams
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.jax_sampler import JaxSampler
from mtrl_jax.serving import protocol as P
from mtrl_jax.serving.client import ServerSampler
from mtrl_jax.serving.launch import LocalServer

TOK = build_byte_tokenizer()
IM_END = TOK.convert_tokens_to_ids("<|im_end|>")
CFG = ModelConfig(model_type="qwen2", vocab_size=len(TOK), hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
LORA = LoRAConfig(rank=2)


def test_protocol_checks_name_the_field():
    ok = {"request_id": "e/t0", "token_ids": [1, 2], "model": "m",
          "sampling_params": {"max_tokens": 4, "temperature": 0.0, "top_k": -1, "logprobs": 0}}
    P.check(ok, P.GENERATE_REQUEST, "req", required=P.GENERATE_REQUEST_REQUIRED)
    P.check(ok["sampling_params"], P.SAMPLING_PARAMS, "sp")
    with pytest.raises(P.ProtocolError, match="missing field 'token_ids'"):
        P.check({"sampling_params": {}}, P.GENERATE_REQUEST, "req",
                required=P.GENERATE_REQUEST_REQUIRED)
    with pytest.raises(P.ProtocolError, match="temperature must be int/float, got str"):
        P.check({"temperature": "0"}, P.SAMPLING_PARAMS, "sp")
    with pytest.raises(P.ProtocolError, match="not in"):
        P.check_token_ids([1, 99], "req", vocab_size=50)
    resp = {"request_id": "x", "choices": [{"index": 0, "token_ids": [5, 6], "finish_reason":
            "stop", "logprobs": {"content": [{"token": "token_id:5", "logprob": -0.1,
                                              "bytes": None, "top_logprobs": []}]}}]}
    with pytest.raises(P.ProtocolError, match="1 log-probs for 2 tokens"):
        P.check_generate_response(resp)


def _server(model_dir: str, tmp) -> LocalServer:
    return LocalServer(model_dir, lora_rank=LORA.rank, slots=8, max_len=512, log=os.path.join(
        tmp, f"serve-{len(os.listdir(tmp))}.log"), startup_timeout_s=120)


@tool
def echo(text: str) -> str:
    """Echo the text back."""
    return text


def _episodes(sampler, n_tasks: int = 6, group: int = 2):
    loop = AgentLoop(TOK, sampler, AgentLoopConfig(max_turns=3, sampling_max_tokens=16,
                                                   max_context_tokens=512))
    tasks = [Task(id=f"t{i}", family="test", name="echo", prompt=f"say {i}")
             for i in range(n_tasks)]
    env = lambda t: FunctionEnvironment([echo], lambda ep: ep.update_reward(0.0))

    async def go():
        try:
            return await loop.run_many(env, tasks, group_size=group, concurrency=8)
        finally:
            await sampler.close()

    trajs = asyncio.run(go())
    assert all(t.error is None for t in trajs), [t.error for t in trajs]
    return {t.episode_id: t for t in trajs}


def _turns(sampler):
    rng = np.random.default_rng(0)

    async def go():
        out = []
        for k in range(3):
            tokens = rng.integers(0, 256, 5 + 7 * k).tolist()
            for _ in range(3):
                res = await sampler.sample(f"m{k}", tokens, 6)
                out.append((res.tokens, res.logprobs, res.finish_reason))
                tokens = tokens + res.tokens + rng.integers(0, 256, 4).tolist()
            sampler.release(f"m{k}")
        await sampler.close()
        return out

    return asyncio.run(go())


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        sa, sb = a[k].samples[0], b[k].samples[0]
        assert sa.tokens == sb.tokens, k
        m = np.asarray(sa.loss_mask, bool)
        np.testing.assert_allclose(np.asarray(sa.logprobs)[m], np.asarray(sb.logprobs)[m],
                                   atol=2e-4)
        assert list(np.asarray(sa.policy_version)[m]) == list(np.asarray(sb.policy_version)[m])


def test_server_backend_matches_the_in_process_sampler_and_survives_a_dead_server(tmp_path):
    base = CausalLM(CFG, None, rngs=nnx.Rngs(0))
    # a policy that often stops and sometimes calls its tool (see test_jax_sampler)
    head = base.lm_head[...]
    base.lm_head[...] = head.at[:, IM_END].add(0.5 * np.sign(np.asarray(head[:, IM_END]) + 1e-3))
    model_dir = str(tmp_path / "model")
    save_model(base, model_dir)
    servers = []
    try:
        for _ in range(2):
            servers.append(_server(model_dir, str(tmp_path)).launch())
        for server in servers:
            server.wait_healthy()
        urls = [server.url for server in servers]
        listing = json.loads(urllib.request.urlopen(urls[0] + P.MODELS).read())
        P.check(listing, P.MODEL_LIST, "models")
        assert [c["id"] for c in listing["data"]] == ["model"]

        greedy = SamplingParams(temperature=0.0, stop_token_ids=(IM_END,))
        local_model = load_model(model_dir, lora=LORA, seed=0)
        local = JaxSampler(local_model, greedy, slots=8, max_len=512)
        remote_model = load_model(model_dir, lora=LORA, seed=0)
        remote = ServerSampler(urls, greedy, model=remote_model,
                               adapter_dir=str(tmp_path / "adapters"))
        v0_local, v0_remote = _episodes(local), _episodes(remote)
        _same(v0_local, v0_remote)
        # multi-turn continuation (the greedy random model answers in one turn above): three
        # turns per episode, "tool results" appended in between; the server reuses the slot
        # whose cache holds the episode so far
        a, b = _turns(local), _turns(remote)
        assert [(t, f) for t, _, f in a] == [(t, f) for t, _, f in b]
        for (_, la, _), (_, lb, _) in zip(a, b, strict=True):
            np.testing.assert_allclose(la, lb, atol=2e-4)
        assert remote.outstanding[urls[0]] == 0 and min(remote.outstanding.values()) == 0
        assert remote.requests >= sum(t.num_turns for t in v0_remote.values())

        # a new LoRA version: exported as a PEFT folder, loaded by name on both servers
        lora = nnx.to_pure_dict(nnx.state(local_model, nnx.LoRAParam))
        new = jax.tree.map(lambda x: np.asarray(x) + 0.3, lora)
        local.update_weights(new, 1)
        remote.update_weights(new, 1)
        for url in urls:
            ids = [c["id"] for c in json.loads(urllib.request.urlopen(url + P.MODELS).read())
                   ["data"]]
            assert ids == ["model", f"p{os.getpid()}-policy-v1"]
        v1_local, v1_remote = _episodes(local), _episodes(remote)
        _same(v1_local, v1_remote)
        assert any(v1_local[k].samples[0].tokens != v0_local[k].samples[0].tokens
                   for k in v0_local)  # the adapters changed the policy
        # version 2 replaces version 1 on the servers
        local.update_weights(jax.tree.map(lambda x: x * -1.0, new), 2)
        remote.update_weights(jax.tree.map(lambda x: x * -1.0, new), 2)
        ids = [c["id"] for c in json.loads(urllib.request.urlopen(urls[1] + P.MODELS).read())
               ["data"]]
        assert ids == ["model", f"p{os.getpid()}-policy-v2"]

        # one server killed after its first answers: every episode still completes once
        victim = servers[0].proc
        answers = []
        orig = remote._post_generate

        async def post_and_kill(body):
            out = await orig(body)
            answers.append(body["request_id"])
            if len(answers) == 3:
                os.killpg(victim.pid, signal.SIGKILL)
            return out

        remote._post_generate = post_and_kill
        v2_local, v2_remote = _episodes(local, n_tasks=8), _episodes(remote, n_tasks=8)
        _same(v2_local, v2_remote)
        assert victim.wait(10) == -signal.SIGKILL
        assert remote.failures[urls[0]] >= 1 and remote.live() == [urls[1]]
        m = remote.metrics()
        assert m["rollout/servers_live"] == 1 and m["rollout/server_failures"] >= 1
        # nothing lost or duplicated: each request id answered once
        assert len(answers) == len(set(answers)) == sum(t.num_turns for t in v2_remote.values())
    finally:
        codes = [server.stop() for server in servers]
    # the survivor stopped cleanly on SIGTERM (no SIGKILL needed); the victim was killed
    assert codes == [-signal.SIGKILL, 0], codes


@pytest.mark.parametrize("k", [0, pytest.param(1, marks=pytest.mark.slow)])  # k=1: ~60 s more
def test_a_training_run_with_the_server_backend(tmp_path, k):
    """Three steps of the trainer sampling through two `mtrl serve` processes, synchronously
    (k = 0) and from a rollout worker process one step ahead (k = 1): the base model before any
    update, then each new LoRA version exported, loaded by name on both and recorded on its
    tokens."""
    from mtrl_jax.config import load_config
    from mtrl_jax.rollout.runner import build_policy
    from mtrl_jax.training.trainer import MultiTurnRLTrainer
    from tests.test_sweep import TINY

    tiny = [o for o in TINY if not o.startswith(("steps=", "checkpoint_interval="))]
    tokenizer, model = build_policy(load_config(None, tiny))
    model_dir = str(tmp_path / "model")
    save_model(model, model_dir)
    tokenizer.save_pretrained(model_dir)
    servers = [_server(model_dir, str(tmp_path)).launch() for _ in range(2)]
    try:
        urls = [server.wait_healthy().url for server in servers]
        over = [o for o in tiny if not o.startswith(("model.tiny=", "lora.lora_rank="))]
        t = MultiTurnRLTrainer(None, overrides=over + [
            f"model.path={model_dir}", f"lora.lora_rank={LORA.rank}", "steps=3",
            "checkpoint_interval=0", f"output_dir={tmp_path / 'run'}", "tracker=none",
            "rollout.backend=server", f"rollout.servers=[{', '.join(urls)}]",
            f"async_config.max_steps_off_policy={k}"], verbose=False)
        hist = t.train()
        t.close()
        assert len(hist) == 3
        assert all(h["rollout/server_requests"] >= 4 and h["rollout/servers_live"] == 2
                   for h in hist)
        assert [h.get("rollout/server_failures", 0) for h in hist] == [0, 0, 0]
        for server in servers:
            stats = json.loads(urllib.request.urlopen(server.url + P.MODELS).read())["data"]
            ids = [c["id"] for c in stats]
            # newer versions than the base are loaded on every server (by the trainer's and
            # the worker's samplers, each under its own process id); each keeps its newest
            assert ids[0] == "model" and all("-policy-v" in i for i in ids[1:])
            assert 2 <= len(ids) <= 1 + (k + 1), ids
        exported = os.listdir(tmp_path / "run" / "served_adapters")
        assert any(e.endswith("-policy-v1") for e in exported), exported
        # each step's episodes were sampled by that step's version, or up to k before it (the
        # ledger's record; the staleness admission applies unchanged)
        with open(tmp_path / "run" / "rollout_ledger.jsonl") as f:
            versions = [json.loads(line)["start_version"] for line in f]
        assert len(versions) == 3
        assert all(s - k <= v <= s for s, v in enumerate(versions)), versions
        if k == 0:
            assert versions == [0, 1, 2]
    finally:
        codes = [server.stop() for server in servers]
    assert codes == [0, 0]  # stopped cleanly on SIGTERM


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    log = str(tmp_path / "serve.log")
    server = LocalServer(str(tmp_path / "no-such-model"), log=log, startup_timeout_s=60)
    with pytest.raises(RuntimeError, match=r"exited with .* \(its log: .*serve\.log\)"):
        server.start()
    assert server.proc.poll() not in (None, 0)
    assert os.path.getsize(log) > 0  # the server said why


def test_seeded_requests_through_the_server_equal_the_in_process_sampler_with_those_seeds():
    """vLLM's per-request ``seed``: a request's tokens follow from its seed whatever else the
    server batches with it, and equal the in-process sampler's for the same seed; the client
    derives each turn's seed from the round's key, the episode and the turn."""
    from mtrl_jax.serving.server import ModelServer

    model = CausalLM(CFG, None, rngs=nnx.Rngs(3))
    server = ModelServer(model, model_name="m", slots=4, max_len=128)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 200, 7).tolist() for _ in range(3)]

    def body(tokens, seed):
        return {"request_id": f"r{seed}", "model": "m", "token_ids": tokens,
                "sampling_params": {"n": 1, "max_tokens": 10, "temperature": 1.0,
                                    "top_p": 0.9, "top_k": -1, "logprobs": 0, "seed": seed}}

    async def together(*bodies):
        return [o["choices"][0]["token_ids"]
                for o in await asyncio.gather(*(server.generate(b) for b in bodies))]

    alone = asyncio.run(together(body(prompts[0], 11)))[0]
    batched = asyncio.run(together(body(prompts[1], 5), body(prompts[0], 11),
                                   body(prompts[2], None)))
    assert batched[1] == alone and len(alone) == 10
    local = JaxSampler(CausalLM(CFG, None, rngs=nnx.Rngs(3)), SamplingParams(), slots=2,
                       max_len=128, seed=99)
    res = asyncio.run(local.sample("e", prompts[0], 10, SamplingParams(
        temperature=1.0, top_p=0.9, max_tokens=10), seed=11))
    assert res.tokens == alone

    # the client's seeds: stable for a round's key, new for another key, episode or turn
    client = ServerSampler.__new__(ServerSampler)
    client.seed, client._round_seed = 0, 0
    client.begin_round(["a"], jax.random.key(4))
    s = client.request_seed("s3/t1#0", 0)
    assert s == client.request_seed("s3/t1#0", 0) and 0 <= s < 2 ** 31
    assert len({s, client.request_seed("s3/t1#0", 1), client.request_seed("s3/t1#1", 0)}) == 3
    client.begin_round(["a"], jax.random.key(5))
    assert client.request_seed("s3/t1#0", 0) != s
