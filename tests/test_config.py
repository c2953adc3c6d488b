"""Recipes: typed configs, dotted overrides, errors that name the key and the closest valid one."""

import glob
import os

import numpy as np
import pytest

from mtrl_jax.config import ConfigError, TrainConfig, flatten, load_config
from mtrl_jax.training.packing import Segment, pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_and_overrides():
    c = load_config(overrides=["rollout.group_size=4", "lora.targets=[q,v]",
                               "optimizer.learning_rate=3e-4", "model.path=null"])
    assert isinstance(c, TrainConfig)
    assert c.rollout.group_size == 4
    assert c.lora.targets == ("q", "v")
    assert c.optimizer.learning_rate == pytest.approx(3e-4)
    assert c.model.path is None
    # dict overrides and keyword overrides; later ones win
    c2 = load_config({"rollout": {"group_size": 2}}, {"rollout.batch_size": 3}, steps=7)
    assert (c2.rollout.group_size, c2.rollout.batch_size, c2.steps) == (2, 3, 7)


def test_recipe_file_and_override_precedence(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rollout:\n  group_size: 6\nsteps: 5\n")
    c = load_config(str(p), ["steps=9"])
    assert c.rollout.group_size == 6 and c.steps == 9


@pytest.mark.parametrize("override, expected", [
    ("rollout.group_sise=4", "'rollout.group_size'"),
    ("rolout.group_size=4", "'rollout'"),
    ("optimizer.lerning_rate=1e-3", "'optimizer.learning_rate'"),
    ("val_sampling_params.sampling_max_token=3", "'val_sampling_params.sampling_max_tokens'"),
    ("async_config.max_step_off_policy=0", "'async_config.max_steps_off_policy'"),
])
def test_misspelt_key_names_path_and_closest(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    key = override.split("=")[0]
    wrong = key if "." in expected else key.split(".")[0]  # a wrong section is named alone
    assert f"'{wrong}'" in msg and "did you mean" in msg and expected in msg


@pytest.mark.parametrize("override, fragment", [
    ("rollout.group_size=four", "rollout.group_size: expected an integer"),
    ("rollout.group_size=0", "rollout.group_size"),
    ("algorithm.loss.name=ppp", "algorithm.loss.name: unknown loss 'ppp'"),
    ("algorithm.advantage=grpo2", "algorithm.advantage.name: unknown advantage 'grpo2'"),
    ("algorithm.policy_loss=cispo", "'algorithm.policy_loss' was replaced by 'algorithm.loss"),
    ("algorithm.loss.clip_high=-1", "algorithm.loss: ppo: clip_high must be >= 0"),
    ("data.system_prompt=maybe", "data.system_prompt"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate"),
    ("async_config.max_steps_off_policy=-1", "async_config.max_steps_off_policy"),
    ("async_config.num_workers=0", "async_config.num_workers"),
    ("async_config.mode=threads", "async_config.mode"),
    ("async_config.heartbeat_timeout_s=0.5", "async_config.heartbeat_timeout_s"),
    ("rollout.simulated_tool_latency_s=-1", "rollout.simulated_tool_latency_s"),
    ("steps", "key=value"),
])
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(overrides=[override])


def test_every_shipped_recipe_loads():
    recipes = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    assert len(recipes) >= 9  # demo + Qwen2.5 x3 + Qwen3 x3 + Llama-3.2 x2
    for r in recipes:
        c = load_config(r)
        head = open(r).read().splitlines()[:8]
        text = "\n".join(head).lower()
        for word in ("command", "hardware", "time", "expected"):
            assert word in text, f"{r}: header lacks '{word}'"
        assert c.rollout.max_context_tokens <= max(c.packing.row_lengths)


def test_flatten_for_params():
    flat = flatten(load_config().to_dict())
    assert flat["rollout.group_size"] == 8 and flat["algorithm.loss.name"] == "ppo"
    assert flat["algorithm.loss.clip_high"] == 0.2 and flat["algorithm.advantage.std_ddof"] == 1


# ------------------------------------------------------------------------------ packing

def _seg(n, adv, start=1):
    toks = np.arange(start, start + n, dtype=np.int32)
    mask = (np.arange(n) >= n // 2).astype(np.int8)
    return Segment(toks, mask, -0.1 * mask.astype(np.float32), adv)


def test_packing_layout():
    segs = [_seg(n, float(i), start=100 * i + 1) for i, n in enumerate([10, 30, 5, 20, 17])]
    b = pack(segs, (16, 32, 64), multiple=2)
    assert b.shape[1] == 32  # smallest length holding the longest (30)
    assert b.shape[0] % 2 == 0 and (b.shape[0] // 2) & (b.shape[0] // 2 - 1) == 0
    assert b.num_tokens == 82
    assert b.efficiency == pytest.approx(82 / b.tokens.size)
    seen = set()
    for r in range(b.shape[0]):
        ids = b.segment_ids[r]
        # segments are contiguous, numbered 1.. within a row, padding (0) only at the end
        nz = ids[ids > 0]
        assert list(nz) == sorted(nz)
        assert (ids[len(nz):] == 0).all()
        for s in np.unique(nz):
            sel = ids == s
            idx = int(b.segment_index[r][sel][0])
            seg = segs[idx]
            assert (b.tokens[r][sel] == seg.tokens).all()
            assert (b.positions[r][sel] == np.arange(len(seg.tokens))).all()
            assert (b.loss_mask[r][sel] == seg.loss_mask).all()
            assert (b.advantages[r][sel] == seg.advantage).all()
            seen.add(idx)
    assert seen == set(range(len(segs)))


def test_packing_too_long_fails_clearly():
    with pytest.raises(ValueError, match="does not fit the longest packing row"):
        pack([_seg(70, 1.0)], (16, 64))


# ------------------------------------------------------------------------------ kernel choices

def test_a_kernel_and_its_parameters_are_built_from_the_registry():
    from mtrl_jax.kernels import CISPOParams, PassKParams, PerTurnParams, PPOParams

    c = load_config({"algorithm": {"advantage": {"name": "grpo_passk", "k": 4},
                                   "loss": {"name": "cispo", "clip_high": 0.3}}})
    assert c.algorithm.advantage.params == PassKParams(k=4)
    assert c.algorithm.loss.params == CISPOParams(clip_low=1.0, clip_high=0.3)
    # a bare name: the kernel's own defaults (CISPO's, not PPO's clip range)
    c = load_config(overrides=["algorithm.loss=cispo",
                               "algorithm.advantage=group_based_per_turn",
                               "algorithm.advantage.gamma=0.5"])
    assert c.algorithm.loss.params == CISPOParams()
    assert c.algorithm.advantage.params == PerTurnParams(gamma=0.5)
    assert load_config(overrides=["algorithm.loss.dual_clip=3"]).algorithm.loss.params == \
        PPOParams(dual_clip=3.0)


def test_an_override_naming_another_kernel_does_not_inherit_the_recipes_parameters():
    from mtrl_jax.kernels import CISPOParams, PPOParams

    recipe = {"algorithm": {"loss": {"name": "ppo", "clip_low": 0.1, "clip_high": 0.3}}}
    c = load_config(recipe, ["algorithm.loss.name=cispo"])
    assert c.algorithm.loss.params == CISPOParams()
    c = load_config(recipe, ["algorithm.loss.clip_high=0.4", "algorithm.loss.name=cispo"])
    assert c.algorithm.loss.params == CISPOParams(clip_high=0.4)  # given with the new name
    c = load_config(recipe, ["algorithm.loss.name=ppo", "algorithm.loss.clip_high=0.5"])
    assert c.algorithm.loss.params == PPOParams(clip_low=0.1, clip_high=0.5)  # same kernel
    c = load_config(recipe, {"algorithm.loss": {"name": "cispo", "clip_low": 0.5}})
    assert c.algorithm.loss.params == CISPOParams(clip_low=0.5)


@pytest.mark.parametrize("overrides, fragment", [
    (["algorithm.loss=is", "algorithm.loss.clip_low=0.1"],
     r"unknown key 'algorithm.loss.clip_low' \(a parameter of \['cispo', 'gspo', 'ppo'\]\): "
     r"loss 'is' takes \['max_weight'\]"),
    (["algorithm.advantage.k=4"],
     r"'algorithm.advantage.k' \(a parameter of \['grpo_passk'\]\): advantage 'group_based'"),
    (["algorithm.advantage=rloo", "algorithm.advantage.normalize_by_std=false"],
     "advantage 'rloo' takes no parameters"),
    (["algorithm.loss.clip_hihg=0.3"], "did you mean 'algorithm.loss.clip_high'"),
    (["algorithm.advantage=grpo_passk", "algorithm.advantage.k=9"],
     "algorithm.advantage.k: pass@9 needs at least 9 samples per task, but rollout.group_size "
     "is 8"),
    (["algorithm.aggregation=seq_mean_token_sum_norm"],
     "algorithm.norm_length: .* rollout.max_turns x rollout.sampling_max_tokens = 512"),
    (["algorithm.aggregation=seq_mean"], "algorithm.aggregation: 'seq_mean' is not one of"),
    (["algorithm.tis_level=segment"], "algorithm.tis_level"),
    (["algorithm.tis_cap=0"], "algorithm: tis.cap must be > 0"),
])
def test_kernel_settings_fail_at_load_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=overrides)


def test_an_estimator_the_trainer_cannot_feed_fails_at_load():
    import dataclasses

    from mtrl_jax.kernels import ADVANTAGE_ESTIMATORS

    entry = dataclasses.replace(ADVANTAGE_ESTIMATORS.get("rloo"), extra_inputs=("values",))
    ADVANTAGE_ESTIMATORS.register("needs_values", entry)
    try:
        with pytest.raises(ConfigError, match=r"algorithm.advantage.name: estimator "
                           r"'needs_values' needs \['values'\], which the trainer does not "
                           r"feed .* choose one of \['group_based', 'group_based_per_turn', "
                           r"'grpo_passk', 'opo', 'reinforce_pp_baseline', 'rloo'\]"):
            load_config(overrides=["algorithm.advantage=needs_values"])
    finally:
        ADVANTAGE_ESTIMATORS._entries.pop("needs_values")


def test_every_registered_kernel_loads_and_round_trips_through_to_dict():
    from mtrl_jax.kernels import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    for adv in ADVANTAGE_ESTIMATORS.names():
        for loss in POLICY_LOSSES.names():
            c = load_config(overrides=[f"algorithm.advantage={adv}", f"algorithm.loss={loss}",
                                       "algorithm.aggregation=seq_mean_token_sum_norm",
                                       "algorithm.norm_length=64", "algorithm.kl_coef=0.1"])
            assert load_config(c.to_dict()) == c
            assert c.loss_config.norm_length == 64 and c.loss_config.kl_coef == 0.1


# ------------------------------------------------------------------------------ the task

def test_the_reward_kind_and_the_task_are_checked_against_the_family():
    assert load_config(overrides=["data.reward=strict"]).data.reward == "strict"
    with pytest.raises(ConfigError, match=r"data.reward: 'sparse' is not a reward of "
                       r"sop_synth:aircraft_inspection; its family offers \['dense', 'strict'\]"):
        load_config(overrides=["data.reward=sparse"])
    with pytest.raises(ConfigError, match=r"data.reward: 'strict' .* offers \['dense'\]"):
        load_config(overrides=["data.task=math:arith", "data.reward=strict"])
    with pytest.raises(ConfigError, match=r"data.task: .*'mathh'"):
        load_config(overrides=["data.task=mathh:arith"])


def test_data_imports_register_a_user_family_before_the_task_is_looked_up():
    family = os.path.join(REPO, "examples", "my_family.py")
    c = load_config(overrides=[f"data.imports=[{family}]", "data.task=warehouse:stock"])
    assert c.data.imports == (family,)
    with pytest.raises(ConfigError, match=r"data.imports: .*no_such_module_xyz"):
        load_config(overrides=["data.imports=[no_such_module_xyz]"])


def test_a_custom_environment_refuses_a_family_reward_kind(tmp_path):
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    with pytest.raises(ValueError, match="a custom make_env defines its own reward"):
        MultiTurnRLTrainer(overrides=["data.reward=strict", f"output_dir={tmp_path}"],
                           make_env=lambda task: None, verbose=False)


# ------------------------------------------------------------------------------ value ranges

#: one bad value per line, and the one dotted key its error must name
BAD_VALUES = [
    ("model.path=''", "model.path"),
    ("model.dtype=int8", "model.dtype"),
    ("model.dtype=floaty", "model.dtype"),
    ("model.param_dtype=int32", "model.param_dtype"),
    ("model.remat=maybe", "model.remat"),
    ("model.attention=flash", "model.attention"),
    ("model.warmup_checkpoint=''", "model.warmup_checkpoint"),
    ("model.tokenizer=demo_words", "model.tokenizer"),  # without model.path
    ("model.tiny={num_heads: 3, num_kv_heads: 2}", "model.tiny.num_heads"),
    ("model.tiny={head_dim: 0}", "model.tiny.head_dim"),
    ("lora.lora_rank=0", "lora.lora_rank"),
    ("lora.lora_alpha=0", "lora.lora_alpha"),
    ("lora.lora_alpha=.nan", "lora.lora_alpha"),
    ("lora.targets=[]", "lora.targets"),
    ("lora.targets=[q,x]", "lora.targets"),
    ("data.task=mathh:arith", "data.task"),
    ("data.system_prompt=maybe", "data.system_prompt"),
    ("data.reward=sparse", "data.reward"),
    ("data.imports=[no_such_module_xyz]", "data.imports"),
    ("data.train_split=''", "data.train_split"),
    ("data.val_split=' '", "data.val_split"),
    ("data.test_split=''", "data.test_split"),
    ("data.n_train=0", "data.n_train"),
    ("data.n_val=0", "data.n_val"),
    ("data.n_test=-1", "data.n_test"),
    ("data.data_seed=-1", "data.data_seed"),
    ("rollout.batch_size=0", "rollout.batch_size"),
    ("rollout.group_size=0", "rollout.group_size"),
    ("rollout.group_size=1", "rollout.group_size"),  # the default estimator is group-relative
    ("rollout.max_turns=0", "rollout.max_turns"),
    ("rollout.sampling_max_tokens=0", "rollout.sampling_max_tokens"),
    ("rollout.max_context_tokens=1", "rollout.max_context_tokens"),
    ("rollout.temperature=-0.1", "rollout.temperature"),
    ("rollout.temperature=.inf", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rollout.top_p=nan", "rollout.top_p"),
    ("rollout.top_k=-1", "rollout.top_k"),
    ("rollout.simulated_tool_latency_s=-1", "rollout.simulated_tool_latency_s"),
    ("rollout.max_tool_result_bytes=255", "rollout.max_tool_result_bytes"),
    ("rollout.max_tool_result_tokens=15", "rollout.max_tool_result_tokens"),
    ("val_sampling_params.sampling_max_tokens=0", "val_sampling_params.sampling_max_tokens"),
    ("val_sampling_params.temperature=-1", "val_sampling_params.temperature"),
    ("val_sampling_params.num_samples=-1", "val_sampling_params.num_samples"),
    ("val_sampling_params.success_threshold=.nan", "val_sampling_params.success_threshold"),
    ("val_sampling_params.success_threshold=-.inf", "val_sampling_params.success_threshold"),
    ("val_sampling_params.max_disagreement_traces=-1",
     "val_sampling_params.max_disagreement_traces"),
    ("algorithm.advantage=grpo2", "algorithm.advantage.name"),
    ("algorithm.advantage.eps=.inf", "algorithm.advantage.eps"),
    ("algorithm.loss.name=ppp", "algorithm.loss.name"),
    ("algorithm.loss.clip_high=.nan", "algorithm.loss.clip_high"),
    ("algorithm.aggregation=sum", "algorithm.aggregation"),
    ("algorithm.norm_length=0", "algorithm.norm_length"),
    ("algorithm.kl_coef=-0.1", "algorithm.kl_coef"),
    ("algorithm.kl_coef=.nan", "algorithm.kl_coef"),
    ("algorithm.kl_estimator=k4", "algorithm.kl_estimator"),
    ("algorithm.entropy_coef=-1", "algorithm.entropy_coef"),
    ("algorithm.tis_mode=clip", "algorithm.tis_mode"),
    ("algorithm.field_credit=maybe", "algorithm.field_credit"),
    ("algorithm.tis_level=segment", "algorithm.tis_level"),
    ("algorithm.tis_cap=.inf", "algorithm.tis_cap"),  # 0: "algorithm: tis.cap must be > 0"
    ("async_config.max_steps_off_policy=-1", "async_config.max_steps_off_policy"),
    ("async_config.mode=threads", "async_config.mode"),
    ("async_config.partial_rollouts=maybe", "async_config.partial_rollouts"),
    ("async_config.num_workers=0", "async_config.num_workers"),
    ("async_config.heartbeat_s=0", "async_config.heartbeat_s"),
    ("async_config.heartbeat_timeout_s=0.5", "async_config.heartbeat_timeout_s"),
    ("async_config.startup_timeout_s=0", "async_config.startup_timeout_s"),
    ("async_config.max_restarts=-1", "async_config.max_restarts"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("optimizer.learning_rate=.nan", "optimizer.learning_rate"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("optimizer.max_grad_norm=-1", "optimizer.max_grad_norm"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps"),
    ("optimizer.decay=step", "optimizer.decay"),
    ("async_config.backend=dask", "async_config.backend"),
    ("async_config.ray_address=' '", "async_config.ray_address"),
    ("async_config.ray_num_cpus=-1", "async_config.ray_num_cpus"),
    ("async_config.ray_num_gpus=-0.5", "async_config.ray_num_gpus"),
    ("mesh.data=0", "mesh.data"),
    ("mesh.fsdp=-2", "mesh.fsdp"),
    ("mesh.tensor=0", "mesh.tensor"),
    ("mesh.shard=never", "mesh.shard"),
    ("mesh={data: -1, fsdp: -1}", "mesh"),
    ("optimizer.min_lr_ratio=1.5", "optimizer.min_lr_ratio"),
    ("optimizer.b1=1", "optimizer.b1"),
    ("optimizer.b2=-0.1", "optimizer.b2"),
    ("optimizer.mini_batches=0", "optimizer.mini_batches"),
    ("optimizer.epochs=0", "optimizer.epochs"),
    ("packing.row_lengths=[]", "packing.row_lengths"),
    ("packing.row_lengths=[0, 1024]", "packing.row_lengths"),
    ("packing.row_multiple=0", "packing.row_multiple"),
    ("packing.shared_prefix_min_tokens=-1", "packing.shared_prefix_min_tokens"),
    ("rollout.shared_prefix_min_tokens=-1", "rollout.shared_prefix_min_tokens"),
    ("rollout.backend=vllm", "rollout.backend"),
    ("rollout.servers=[localhost:8000]", "rollout.servers"),
    ("rollout.server_timeout_s=0", "rollout.server_timeout_s"),
    ("packing.round_rows=nearest", "packing.round_rows"),
    ("rollout.tool_specs=system", "rollout.tool_specs"),
    ("steps=-1", "steps"),
    ("eval_interval=-1", "eval_interval"),
    ("checkpoint_interval=-1", "checkpoint_interval"),
    ("trace_samples_per_step=-1", "trace_samples_per_step"),
    ("seed=-1", "seed"),
    ("output_dir=''", "output_dir"),
    ("experiment_name=''", "experiment_name"),
    ("run_name=''", "run_name"),
    ("run_tags={sweep: [1, 2]}", "run_tags"),
    ("tracker=wandb", "tracker"),
    ("export_merged=1", "export_merged"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES)
def test_a_bad_value_fails_at_load_naming_its_own_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert [line.split(": ", 1)[0] for line in e.value.errors] == [key], e.value.errors
    assert str(e.value) == "\n".join(e.value.errors)


def _leaf_keys(cls=TrainConfig, prefix=""):
    import dataclasses
    import typing

    from mtrl_jax.config import KernelChoice

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and tp is not KernelChoice:
            yield from _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_key_has_a_rule_and_a_bad_value_in_the_table():
    from mtrl_jax.config import _RULES

    keys = set(_leaf_keys())
    assert keys == set(_RULES)  # a new field gets its range (or None) in _RULES
    named = {k for _, k in BAD_VALUES}
    untested = {k for k in keys if not any(n == k or n.startswith(k + ".") for n in named)}
    assert untested == set()


def test_the_lora_targets_are_the_models():
    from mtrl_jax.config import LORA_TARGETS
    from mtrl_jax.models.lora import LORA_TARGETS as MODEL_TARGETS

    assert LORA_TARGETS == MODEL_TARGETS


def test_the_group_relative_estimators_are_those_that_give_zero_for_groups_of_one():
    import jax.numpy as jnp

    from mtrl_jax.config import GROUP_RELATIVE_ESTIMATORS
    from mtrl_jax.kernels import ADVANTAGE_ESTIMATORS, compute_advantages

    zero_at_one = set()
    for name in ADVANTAGE_ESTIMATORS.names():
        turn = ADVANTAGE_ESTIMATORS.get(name).level == "turn"
        for n in (1, 5):  # 5: more than grpo_passk's default k (see the next test)
            r = jnp.asarray(np.arange(3 * n, dtype=np.float32).reshape(3, n) ** 2)
            rewards = jnp.stack([r, r], axis=-1) if turn else r
            adv = compute_advantages(name, rewards, lengths=jnp.full((3, n), 5) + r)
            if n == 1 and not np.asarray(adv).any():
                zero_at_one.add(name)
            if n > 1:
                assert np.asarray(adv).any(), name  # a signal once a group has more
    assert zero_at_one == GROUP_RELATIVE_ESTIMATORS


@pytest.mark.parametrize("estimator", ["group_based", "rloo", "grpo_passk",
                                       "group_based_per_turn", "reinforce_pp_baseline", "opo"])
def test_a_group_of_one_with_a_group_relative_estimator_fails(estimator):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["rollout.group_size=1", f"algorithm.advantage={estimator}"])
    line = next(x for x in e.value.errors if x.startswith("rollout.group_size: "))
    assert repr(estimator) in line and "every advantage would be 0" in line


def test_pass_at_k_over_groups_of_exactly_k_fails():
    """The only subset of k samples is the whole group: every sample gets the same value."""
    import jax.numpy as jnp

    from mtrl_jax.kernels import PassKParams, compute_advantages

    r = jnp.asarray([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.5]])
    assert not np.asarray(compute_advantages("grpo_passk", r, params=PassKParams(k=4))).any()
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["algorithm.advantage={name: grpo_passk, k: 4}",
                               "rollout.group_size=4"])
    (line,) = e.value.errors
    assert line.startswith("algorithm.advantage.k: pass@4 over groups of exactly 4 samples")
    load_config(overrides=["algorithm.advantage={name: grpo_passk, k: 3}",
                           "rollout.group_size=4"])


def test_every_error_is_reported_at_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rollout:\n  top_p: 1.5\n  group_sise: 4\noptimizer:\n  warmup_steps: -3\n"
                      "lora: {lora_alpha: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), ["checkpoint_interval=-1", "data.n_train=0", "steps",
                                  "rollout.top_k=[1", "algorithm.loss.clip_hihg=0.3",
                                  "trace_samples_per_step=-1"])
    errors = e.value.errors
    assert errors == [
        "override 'steps' is not key=value (e.g. rollout.group_size=4)",
        "rollout.top_k: the value '[1' is not valid YAML: expected ',' or ']', but got "
        "'<stream end>' (line 1, column 3)",
        "unknown key 'rollout.group_sise' -- did you mean 'rollout.group_size'?",
        "unknown key 'algorithm.loss.clip_hihg': loss 'ppo' takes "
        "['clip_high', 'clip_low', 'dual_clip'] -- did you mean 'algorithm.loss.clip_high'?",
        "lora.lora_alpha: must be > 0, got 0.0",
        "data.n_train: must be >= 1 (null = the whole split), got 0",
        "rollout.top_p: must be in (0, 1], got 1.5",
        "optimizer.warmup_steps: must be >= 0, got -3",
        "checkpoint_interval: must be >= 0 (0 = never), got -1",
        "trace_samples_per_step: must be >= 0, got -1",
    ]
    assert str(e.value) == "\n".join(errors)


def test_checkpoint_interval_is_named_itself():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["checkpoint_interval=-1"])
    assert e.value.errors == ["checkpoint_interval: must be >= 0 (0 = never), got -1"]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["eval_interval=-2", "checkpoint_interval=-1"])
    assert [x.split(":")[0] for x in e.value.errors] == ["eval_interval", "checkpoint_interval"]


def test_a_recipe_that_is_not_yaml_fails_with_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rollout:\n  top_p: [0.5\nsteps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe))
    (line,) = e.value.errors
    assert line.startswith(f"recipe {str(recipe)!r}: not valid YAML: ") and "line 3" in line


def test_a_config_built_in_python_is_checked_too():
    import dataclasses
    import pickle

    from mtrl_jax.config import RolloutSection

    with pytest.raises(ConfigError) as e:
        TrainConfig(rollout=RolloutSection(top_p=2.0, top_k=-1))
    assert e.value.errors == ["rollout.top_p: must be in (0, 1], got 2.0",
                              "rollout.top_k: must be >= 0 (0 = off), got -1"]
    with pytest.raises(ConfigError, match=r"^seed: must be >= 0, got -1$"):
        dataclasses.replace(load_config(), seed=-1)
    again = pickle.loads(pickle.dumps(e.value))  # e.g. from a rollout worker
    assert again.errors == e.value.errors
