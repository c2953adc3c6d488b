"""The SmolLM2 demo's warm-up data (the real model's run is measured in experiments/LOG.md):
the teacher's episodes go through the real agent loop, skip the tool at the configured rate,
and every one of them is scored correct by the task's own reward."""

import dataclasses

import numpy as np

from mtrl_jax.demo_smollm2 import SmolWarmupConfig, teacher_trajectories
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from tests.test_tool_fallback import PLAIN_CHATML


def test_teacher_episodes_skip_the_tool_at_the_configured_rate_and_are_correct():
    tok = build_byte_tokenizer(chat_template=PLAIN_CHATML)  # no tool section, like SmolLM2's
    cfg = dataclasses.replace(SmolWarmupConfig(), episodes=200)
    trajs = teacher_trajectories(tok, cfg, max_context_tokens=4096)
    assert all(t.error is None and t.finish_reason == "answered" for t in trajs)
    assert all(t.reward_metrics["strict"] == 1.0 for t in trajs)  # the teacher is always right
    skipped = np.mean([t.num_turns == 1 for t in trajs])
    assert abs(skipped - cfg.skip_tool_prob) < 0.1
    with_tool = [t for t in trajs if t.num_turns == 2]
    assert all(t.tool_calls[0].name == "calculator" and t.tool_calls[0].error is None
               for t in with_tool)
    text = tok.decode(trajs[0].samples[0].tokens)
    assert '"name": "calculator"' in text  # the tool specs reached the prompt (fallback)
