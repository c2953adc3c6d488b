"""Per-field credit (``algorithm.field_credit``): each answer field's value tokens carry that
field's own group advantage, every other token the episode's."""

from __future__ import annotations

import numpy as np
import pytest

from mtrl_jax.config import ConfigError, load_config
from mtrl_jax.kernels import RLOOParams
from mtrl_jax.kernels.advantages import GroupBasedParams
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.trajectory import Sample, Trajectory
from mtrl_jax.training.batch import advantage_inputs, compute_step_advantages, episode_segments
from mtrl_jax.training.field_credit import (
    apply_field_credit,
    field_advantages,
    token_ends,
    value_spans,
)


def chars(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def decode_chars(ids) -> str:
    return "".join(chr(i) for i in ids)


def episode(answer: str, fields: dict[str, float], *, finish="answered", eid="e",
            tool_turn: str | None = "<tool_call>x</tool_call>") -> Trajectory:
    """A character-level episode: an optional tool-call turn, then the answer turn."""
    s = Sample()
    turn = 0
    if tool_turn is not None:
        s.add_context(chars("Q"), turn)
        s.add_sampled(chars(tool_turn), [-1.0] * len(tool_turn), turn)
        turn += 1
    s.add_context(chars("R"), turn)
    s.add_sampled(chars(answer), [-1.0] * len(answer), turn)
    reward = float(np.mean(list(fields.values()))) if fields else 0.0
    metrics = {f"field/{k}": v for k, v in fields.items()}
    return Trajectory(task_id="t", episode_id=eid, samples=[s], messages=[],
                      finish_reason=finish, num_turns=turn + 1, reward=reward,
                      reward_metrics=metrics)


def answer(**values) -> str:
    import json
    return "<final_output>" + json.dumps(values) + "</final_output>"


# ------------------------------------------------------------------------- value spans

@pytest.mark.parametrize("text,want", [
    ('<final_output>{"a": "pass", "b" : 3}</final_output>', {"a": "pass", "b": "3"}),
    ('say <final_output>{"a":"x\\"y"}</final_output>', {"a": 'x\\"y'}),
    ('<final_output>```json\n{"a": "yes"}\n```</final_output>', {"a": "yes"}),
    ('<final_output>{"a": {"x": 1}, "b": [1, 2]}</final_output>',
     {"a": '{"x": 1}', "b": "[1, 2]"}),
    ('<final_output>{"a": "1"}</final_output> <final_output>{"a": "2"}</final_output>',
     {"a": "2"}),                                                # the last block, as scored
    ('<final_output>{"a": "1", "a": "2"}</final_output>', {"a": "2"}),  # json keeps the last
    ('<final_output>{"a": "no"</final_output>', {}),              # unclosed object
    ('<final_output>{"a": "no"}', {}),                            # unclosed block
    ('<final_output>see {"a": "no"}</final_output>', {}),         # text before the object
    ('<final_output>{"a" "no"}</final_output>', {}),
    ('<final_output>{}</final_output>', {}),
    ("", {}), (None, {}),
])
def test_value_spans_find_each_top_level_value(text, want):
    got = value_spans(text)
    assert {k: text[a:b] for k, (a, b) in got.items()} == want


def test_token_ends_follow_prefix_decodes_of_a_real_tokenizer():
    tok = build_byte_tokenizer()
    text = '{"a": "pässt"}<|im_end|>'
    ids = tok.encode(text, add_special_tokens=False)
    decode = lambda x: tok.decode(x, skip_special_tokens=False)
    ends = token_ends(decode, ids)
    assert ends[-1] == len(decode(ids)) == len(text)
    assert np.all(np.diff(ends) >= 0)
    assert len(ids) == len(text.encode()) - len("<|im_end|>") + 1  # bytes + one special token
    # "ä" is two byte tokens: the first ends the character, the second adds none
    i = text.index("ä")
    j = [k for k in range(len(ids)) if ends[k] == i + 1]
    assert len(j) == 2


# ------------------------------------------------------------------- field advantages

def test_field_advantages_are_grpo_of_each_fields_scores():
    group = [episode(answer(a="1", b="1"), {"a": 1.0, "b": 0.0}),
             episode(answer(a="1", b="1"), {"a": 1.0, "b": 1.0}),
             episode(answer(a="1", b="1"), {"a": 0.0, "b": 1.0}),
             episode(answer(a="1", b="1"), {"a": 0.0, "b": 1.0}, finish="error")]
    valid = advantage_inputs(group, 4).valid
    got = field_advantages(group, valid, ["a", "b"])
    for k, scores in enumerate([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]):
        x = np.asarray(scores)
        ref = (x - x.mean()) / (x.std(ddof=1) + GroupBasedParams().eps)  # numpy GRPO
        np.testing.assert_allclose(got[0, :3, k], ref, rtol=1e-5)
        assert got[0, 3, k] == 0.0  # the failed episode: no advantage, not in the baseline
    dr = field_advantages(group, valid, ["a"], GroupBasedParams(normalize_by_std=False))
    np.testing.assert_allclose(dr[0, :3, 0], [1 / 3, 1 / 3, -2 / 3], rtol=1e-5)


# ---------------------------------------------------------------- per-token advantages

def test_value_tokens_carry_their_fields_advantage_and_the_rest_the_episodes():
    group = [episode(answer(mechanical="pass", serial="match"),
                     {"mechanical": 1.0, "serial": 0.0}, eid="a"),
             episode(answer(mechanical="fail", serial="mismatch"),
                     {"mechanical": 0.0, "serial": 1.0}, eid="b"),
             episode("no answer at all", {"mechanical": 0.0, "serial": 0.0}, eid="c"),
             episode(answer(mechanical="pass", serial="match"),
                     {"mechanical": 1.0, "serial": 0.0}, finish="error", eid="d")]
    x = advantage_inputs(group, 4)
    adv = compute_step_advantages(x, "rloo", RLOOParams())
    segs = episode_segments(group, adv, x.valid)
    fadv = field_advantages(group, x.valid, ["mechanical", "serial"])[0]
    out, m = apply_field_credit(segs, group, x.valid, decode_chars)
    assert [s.index for s in out] == [0, 1, 2]
    assert m["train/field_credit/episodes"] == pytest.approx(2 / 3)  # c has no parseable block
    for s, o in zip(segs, out, strict=True):
        tokens = decode_chars(s.tokens)
        a = np.asarray(o.advantage)
        base = float(adv.reshape(-1)[s.index])
        if s.index == 2:  # untouched: the episode's scalar advantage
            assert o is s
            continue
        expected = np.where(np.asarray(s.loss_mask) > 0, base, 0.0)
        spans = value_spans(tokens)
        for k, f in enumerate(["mechanical", "serial"]):
            lo, hi = spans[f]
            expected[lo:hi] = fadv[s.index, k]
        np.testing.assert_allclose(a, expected, rtol=1e-6)
        # keys, braces, tags and the tool-call turn keep the episode's advantage
        assert a[tokens.index("<tool_call>")] == pytest.approx(base)
        assert a[tokens.index('"serial"')] == pytest.approx(base)
    # a's "match" was wrong (serial 0) while b's "mismatch" was right: opposite signs, although
    # a's episode advantage (mechanical right) is the larger one
    a_match = np.asarray(out[0].advantage)[decode_chars(out[0].tokens).index("match")]
    b_mismatch = np.asarray(out[1].advantage)[decode_chars(out[1].tokens).index("mismatch")]
    assert a_match < 0 < b_mismatch
    assert m["train/field_credit/tokens"] == len("passmatch") + len("failmismatch")


def test_multi_token_values_of_a_real_tokenizer_are_all_credited():
    tok = build_byte_tokenizer()
    decode = lambda x: tok.decode(x, skip_special_tokens=False)
    group = []
    for value, score in [("pässé", 1.0), ("fail", 0.0)]:
        s = Sample()
        s.add_context(tok.encode("Q", add_special_tokens=False), 0)
        ids = tok.encode(answer(a=value).encode().decode("unicode_escape") + "<|im_end|>",
                         add_special_tokens=False)
        s.add_sampled(ids, [-1.0] * len(ids), 0)
        group.append(Trajectory(task_id="t", episode_id=value, samples=[s], messages=[],
                                finish_reason="answered", num_turns=1, reward=score,
                                reward_metrics={"field/a": score}))
    x = advantage_inputs(group, 2)
    adv = compute_step_advantages(x, "rloo", RLOOParams())  # +1 / -1
    out, m = apply_field_credit(episode_segments(group, adv, x.valid), group, x.valid, decode)
    fa = field_advantages(group, x.valid, ["a"])[0, :, 0]
    a0 = np.asarray(out[0].advantage)
    assert m["train/field_credit/tokens"] == len("pässé".encode()) + len("fail")
    # every byte of the two-byte characters, the last one included
    assert int((a0 == fa[0]).sum()) == len("pässé".encode())


def test_field_credit_needs_an_episode_level_estimator():
    with pytest.raises(ConfigError, match="field_credit"):
        load_config(None, ["algorithm.field_credit=true",
                           "algorithm.advantage.name=group_based_per_turn"])
    assert load_config(None, ["algorithm.field_credit=true"]).algorithm.field_credit


def test_the_trainer_credits_fields_with_its_own_tokenizer(tmp_path, monkeypatch):
    from mtrl_jax.envs.base import Environment, Task
    from mtrl_jax.training import trainer as trainer_mod
    from tests.test_trainer import TINY

    class TwoFields(Environment):  # field a: the answer is long; field b: it has an "e"
        def reward(self, ep):
            text = next((m["content"] for m in reversed(ep.messages)
                         if m["role"] == "assistant"), "")
            a, b = float(len(text) > 4), float("e" in text)
            ep.update_reward((a + b) / 2, {"field/a": a, "field/b": b})

    seen = {}
    real = trainer_mod.apply_field_credit

    def spy(segments, trajs, valid, decode, params):
        seen.update(trajs=trajs, decode=decode, params=params)
        return real(segments, trajs, valid, decode, params)

    monkeypatch.setattr(trainer_mod, "apply_field_credit", spy)
    tasks = [Task(id=f"t{i}", family="custom", name="two", prompt=f"Say {i}.", split="train")
             for i in range(4)]
    t = trainer_mod.MultiTurnRLTrainer(
        overrides=TINY + ["steps=1", f"output_dir={tmp_path}", "algorithm.field_credit=true",
                          "algorithm.advantage.normalize_by_std=false", "tracker=none"],
        train_tasks=tasks, val_tasks=tasks[:2], make_env=lambda task: TwoFields(),
        verbose=False)
    try:
        m = t.train_step()
    finally:
        t.close()
    # the random tiny model writes no <final_output>: nothing to credit, but the step ran it
    assert m["train/field_credit/episodes"] == 0.0 and m["train/field_credit/tokens"] == 0.0
    assert seen["params"] == GroupBasedParams(normalize_by_std=False)  # the recipe's estimator
    traj = seen["trajs"][0]
    s = traj.samples[-1]
    sampled = [tok for tok, mask in zip(s.tokens, s.loss_mask, strict=True) if mask]
    text = seen["decode"](sampled)
    assert traj.messages[-1]["role"] == "assistant"
    assert traj.messages[-1]["content"] in text  # the decode the agent loop read the turn with
