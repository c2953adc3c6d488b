"""The demo's pieces: the word-level tokenizer, the noisy teacher and a tiny warm-up + RL run."""

import dataclasses
import json
import random

import numpy as np
import pytest

from mtrl_jax.demo import (
    DEMO_RECIPE,
    WarmupConfig,
    demo_corpus,
    teacher_trajectories,
    teacher_turns,
    warmup,
)
from mtrl_jax.envs.families import load_tasks
from mtrl_jax.models.tokenizer import build_word_tokenizer, load_tokenizer, word_pieces
from mtrl_jax.rollout.parsing import parse_tool_calls


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(demo_corpus(0))


def test_word_tokenizer_round_trips_tool_calls_and_answers(tok, tmp_path):
    call = ('<tool_call>\n{"name": "verify_serial", "arguments": {"aircraft_id": "U17"}}\n'
            '</tool_call>')
    ids = tok.encode(call, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert len(ids) == len(word_pieces(call)) == 17
    parsed = parse_tool_calls(tok.decode(ids))
    assert parsed.tool_calls[0].name == "verify_serial"
    assert parsed.tool_calls[0].arguments == {"aircraft_id": "U17"}
    answer = '<final_output>{"mechanical": "pass", "ready": "no"}</final_output>'
    text = tok.decode(tok.encode(answer, add_special_tokens=False))
    assert json.loads(text[len("<final_output>"):-len("</final_output>")]) == \
        {"mechanical": "pass", "ready": "no"}
    assert tok.encode("zebra", add_special_tokens=False) == [tok.unk_token_id]
    # saved and loaded back through transformers: same pieces (AutoTokenizer would swap in the
    # pre-tokenizer of config.json's model type)
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    again = load_tokenizer(tmp_path)
    assert again.encode(call, add_special_tokens=False) == ids


def test_teacher_is_noisy_only_where_it_should_be():
    tasks = load_tasks("sop_synth:preflight", "train", 400)
    exact = WarmupConfig(teacher_bias=0.0, skip_prob=0.0)
    biased = WarmupConfig(teacher_bias=1.0, skip_prob=0.0)
    for t in tasks[:100]:
        turns = teacher_turns(t, random.Random(0), exact)
        final = json.loads(turns[-1][len("<final_output>"):-len("</final_output>")])
        assert final == t.expected  # no bias, no skips: the oracle
        assert sum(tc.count("<tool_call>") for tc in turns[:-1]) == 3
    flipped = 0
    for t in tasks:
        row = t.data["row"]
        turns = teacher_turns(t, random.Random(0), biased)
        final = json.loads(turns[-1][len("<final_output>"):-len("</final_output>")])
        border = int(row["deviation_kg"]) in (1, 2)
        assert (final["mechanical"] != t.expected["mechanical"]) == border
        assert (final["serial"] != t.expected["serial"]) == (row["registry"] == "pending")
        assert (final["electrical"] != t.expected["electrical"]) == (row["battery"] in
                                                                     ("nominal", "degraded"))
        flipped += border
    assert 0 < flipped < len(tasks)


def test_the_warmup_trains_on_the_prompts_that_rl_renders(tok):
    """The teacher's episodes start with exactly the prompt that the demo recipe's agent loop
    renders for the same task (once they carried the tool-spec fallback that RL does not)."""
    import asyncio

    from mtrl_jax.config import load_config
    from mtrl_jax.demo import DEMO_TASK
    from mtrl_jax.envs.families import make_env
    from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
    from mtrl_jax.rollout.sampler import ScriptedSampler

    trajs = teacher_trajectories(tok, WarmupConfig(episodes=6))
    tasks = {t.id: dataclasses.replace(t, system=None)
             for t in load_tasks(DEMO_TASK, "train", None, 0)}
    rl_cfg = AgentLoopConfig.from_rollout(load_config(DEMO_RECIPE).rollout)
    loop = AgentLoop(tok, ScriptedSampler(tok, lambda *_: "done", stop_token_id=tok.eos_token_id),
                     rl_cfg)
    for tr in trajs:
        task = tasks[tr.task_id]
        rl = asyncio.run(loop.run(make_env(task), task, episode_id="x"))

        def prompt(t):
            a = t.samples[0].arrays()
            return list(a["tokens"][:int(np.argmax(a["loss_mask"] > 0))])

        assert prompt(tr) == prompt(rl) and len(prompt(tr)) < 64


def test_tiny_warmup_then_rl_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MTRL_DATA_DIR", str(tmp_path / "data"))
    cfg = WarmupConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=2, head_dim=16, episodes=64, steps=3, batch_episodes=16)
    trajs = teacher_trajectories(build_word_tokenizer(demo_corpus(0)), cfg)
    assert all(t.finish_reason == "answered" and t.error is None for t in trajs)
    assert np.mean([t.reward_metrics["strict"] for t in trajs]) < 1.0  # a noisy teacher
    base = warmup(cfg, verbose=False)
    assert warmup(cfg, verbose=False) == base  # cached
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    t = MultiTurnRLTrainer(
        DEMO_RECIPE, overrides=[
            f"model.path={base}", f"output_dir={tmp_path / 'run'}", "steps=1",
            "eval_interval=1", "data.n_val=4", "val_sampling_params.num_samples=2",
            "rollout.batch_size=2", "rollout.group_size=2", "lora.lora_rank=2"],
        verbose=False)
    hist = t.train()
    test = t.evaluate("test", tasks=t.val_tasks[:2])
    t.close()
    assert len(hist) == 1 and "val/greedy/strict_success" in hist[0]
    # the prompt leaves room to answer (the tool-spec fallback once filled the demo's 256-token
    # context with the prompt alone: every episode truncated before its first token)
    assert hist[0]["rollout/tokens/response_mean"] > 0 and hist[0]["train/tokens"] > 0
    assert "test/greedy/strict_success" in test and "test/greedy/field_acc" in test
    assert dataclasses.is_dataclass(t.config)
