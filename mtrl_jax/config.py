"""Typed run configuration: frozen dataclasses, filled from a YAML recipe plus dotted overrides.

A recipe is a YAML mapping whose keys mirror :class:`TrainConfig`; anything it leaves out keeps
the default. Overrides are ``"section.key=value"`` strings (values parsed as YAML, so
``rollout.temperature=0.7``, ``lora.targets=[q,v]`` and ``model.path=null`` work) or a dict of
dotted keys. A key that does not exist fails with its dotted path and the closest valid name::

    >>> load_config(overrides=["rollout.group_sise=4"])
    ConfigError: unknown key 'rollout.group_sise' -- did you mean 'rollout.group_size'?

Kernels are chosen by name together with their parameters, which are the kernel registry's own
frozen dataclasses (:data:`~mtrl_jax.kernels.ADVANTAGE_ESTIMATORS`,
:data:`~mtrl_jax.kernels.POLICY_LOSSES`), built and validated here, when the recipe loads::

    algorithm:
      advantage: {name: grpo_passk, k: 4}
      loss: {name: cispo, clip_high: 0.28}

``algorithm.loss=cispo`` (a bare name) means ``{name: cispo}`` with CISPO's own defaults. A
parameter belongs to the kernel named beside it: an override that changes the name
(``algorithm.loss.name=cispo`` over a recipe's ``ppo`` block) starts from the new kernel's
defaults instead of carrying the old kernel's settings over, and a parameter the named kernel
does not take fails, naming the dotted key and the valid ones.

Every value is checked when the recipe loads (:data:`_RULES`: counts and sizes have a minimum,
probabilities their interval, floats must be finite, ...), and so are the settings that only
make sense together (a group-relative estimator needs ``rollout.group_size >= 2``). All the
problems of a recipe and its overrides come in one :class:`ConfigError`, one line each, naming
the dotted key::

    >>> load_config(overrides=["rollout.top_p=1.5", "checkpoint_interval=-1"])
    ConfigError: rollout.top_p: must be in (0, 1], got 1.5
    checkpoint_interval: must be >= 0 (0 = never), got -1
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema.

    ``errors`` holds every problem found, one line each: ``"dotted.key: message"`` for a bad
    value (``rollout.top_p: must be in (0, 1], got 1.5``); an unknown or replaced key is named
    in quotes (``unknown key 'rollout.group_sise' -- did you mean 'rollout.group_size'?``).
    ``str(e)`` is those lines joined by newlines. Built from messages (a message spanning
    several lines becomes one line) or other ConfigErrors (their lines are taken over).
    """

    def __init__(self, *errors: str | ConfigError):
        lines: list[str] = []
        for e in errors:
            if isinstance(e, ConfigError):
                lines.extend(e.errors)
            else:
                lines.append(" ".join(x.strip() for x in str(e).splitlines() if x.strip()))
        self.errors = lines
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickles (e.g. from a rollout worker) keep the lines apart
        return (type(self), tuple(self.errors))


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """``path``: a local HF checkpoint directory (config.json, safetensors, tokenizer). Without
    it, ``tiny`` builds a small random model (dict of :class:`~mtrl_jax.models.ModelConfig`
    fields) with the built-in ``tokenizer``, ``byte`` (the only one: a checkpoint brings its
    own tokenizer, e.g. the demo's warm-up output with its word tokenizer)."""

    path: str | None = None
    tiny: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, tie_word_embeddings=True))
    tokenizer: str = "byte"
    # activations and matmuls / the frozen base weights (LoRA weights and optimizer: f32);
    # ``auto`` = bfloat16 on GPU and TPU, float32 on CPU (mtrl_jax/models/accelerator.py)
    dtype: str = "auto"
    param_dtype: str = "auto"
    # the packed forward's attention: xla (dense mask) | pallas (blockwise kernel) | auto (XLA on
    # CPU and TPU, the kernel on GPU after a probe)
    attention: Literal["auto", "xla", "pallas"] = "auto"
    remat: bool = False  # recompute each layer in the train step's backward (memory for time)
    warmup_checkpoint: str | None = None  # a base the demo's SFT warm-up wrote (see demo.py)


@dataclasses.dataclass(frozen=True)
class LoRASection:
    lora_rank: int = 16
    lora_alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """``task``: ``family:name`` (see :mod:`mtrl_jax.envs.families`). ``n_train`` / ``n_val``
    limit the splits (None = all). ``system_prompt``: ``task`` renders the task's system prompt
    (the SOP); ``none`` drops it (for tiny models that learned the procedure in a warm-up).
    ``reward``: a reward kind the task family offers (SOP families: ``dense`` or ``strict``).
    ``imports``: modules (dotted names or ``.py`` paths) imported before the task is looked up,
    so a user's own task family registers itself (rollout workers import them too)."""

    task: str = "sop_synth:aircraft_inspection"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    n_train: int | None = None
    n_val: int | None = 64
    n_test: int | None = 200
    data_seed: int = 0
    system_prompt: Literal["task", "none"] = "task"
    reward: str | None = None  # one of the family's reward kinds; None = the family's default
    imports: tuple[str, ...] = ()  # modules (or .py files) that register user task families


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    """``batch_size`` tasks per step, ``group_size`` episodes each."""

    batch_size: int = 8
    group_size: int = 8
    max_turns: int = 4
    sampling_max_tokens: int = 128
    max_context_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    simulated_tool_latency_s: float = 0.0  # added to every tool call (benchmarks)
    # a tool result longer than this is cut (bytes of UTF-8 first, so a huge result is never
    # tokenised whole; then tokens), and the model reads a note saying so
    max_tool_result_bytes: int = 16384
    max_tool_result_tokens: int = 1024
    # tool specs: through the chat template, or the system message when the template has no tool
    # section (auto); or through the template only (template: none if it has no tool section)
    tool_specs: Literal["auto", "template"] = "auto"
    # a group's common prompt (at least this many equal tokens) is encoded once and its cache
    # copied to the group's slots; 0 = each episode encodes its own prompt
    shared_prefix_min_tokens: int = 16
    # who samples: the in-process JAX decoder (jax), or inference servers speaking vLLM's API
    # (server: a real `vllm serve` or `mtrl serve`; mtrl_jax/serving), listed in `servers`
    backend: Literal["jax", "server"] = "jax"
    servers: tuple[str, ...] = ()
    server_timeout_s: float = 300.0


@dataclasses.dataclass(frozen=True)
class ValSamplingSection:
    """Validation: one greedy episode per task (strict task success, field accuracy,
    completion) plus ``num_samples`` sampled ones at ``temperature`` for pass@k."""

    sampling_max_tokens: int = 128
    temperature: float = 1.0
    num_samples: int = 8
    success_threshold: float = 1.0  # pass@k counts samples with reward >= this
    max_disagreement_traces: int = 20


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """A kernel chosen by ``name`` with its ``params``: an instance of the registry entry's own
    frozen parameter dataclass (e.g. :class:`~mtrl_jax.kernels.PPOParams`). In YAML it is one
    mapping, ``{name: ppo, clip_high: 0.28}``, or a bare name."""

    name: str
    params: Any

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.params)}


def _choice_factory(kind: str, name: str):
    def make() -> KernelChoice:
        return KernelChoice(name, _registry(kind).get(name).params_cls())

    return make


def _registry(kind: str):
    from mtrl_jax.kernels import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    return {"advantage": ADVANTAGE_ESTIMATORS, "loss": POLICY_LOSSES}[kind]


@dataclasses.dataclass(frozen=True)
class AlgorithmSection:
    """The estimator and the loss with their own parameters (see the module docstring), and what
    every loss shares: the aggregation (``norm_length`` is the constant of
    ``seq_mean_token_sum_norm``), the KL penalty against the base (adapters off), the entropy
    bonus and truncated importance sampling of the sampler/trainer mismatch (``tis_mode: auto``
    = ``truncate`` when ``async_config.max_steps_off_policy > 0``, else ``none``).
    ``field_credit``: the tokens of each answer field's value get that field's own group
    advantage (:mod:`mtrl_jax.training.field_credit`; needs ``field/<name>`` reward metrics)."""

    advantage: KernelChoice = dataclasses.field(
        default_factory=_choice_factory("advantage", "group_based"),
        metadata={"registry": "advantage"})
    loss: KernelChoice = dataclasses.field(
        default_factory=_choice_factory("loss", "ppo"), metadata={"registry": "loss"})
    aggregation: str = "token_mean"
    norm_length: int | None = None
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    tis_mode: Literal["auto", "none", "truncate", "mask"] = "auto"
    tis_level: Literal["token", "sequence", "geometric"] = "token"
    tis_cap: float = 2.0
    field_credit: bool = False


#: recipe keys that were replaced, and what replaced them
RENAMED_KEYS = {
    "algorithm.advantage_method": "algorithm.advantage.name",
    "algorithm.normalize_by_std": "algorithm.advantage.normalize_by_std",
    "algorithm.policy_loss": "algorithm.loss.name",
    "algorithm.clip_low": "algorithm.loss.clip_low",
    "algorithm.clip_high": "algorithm.loss.clip_high",
}
#: dotted paths of kernel choices
CHOICES = {"algorithm.advantage": "advantage", "algorithm.loss": "loss"}


@dataclasses.dataclass(frozen=True)
class AsyncSection:
    """Asynchronous rollouts (see :mod:`mtrl_jax.rollout.worker`). Training step ``s`` only uses
    episodes that started on policy version ``>= s - max_steps_off_policy``.

    ``mode``: ``auto`` = synchronous in the trainer's process for k = 0, rollout worker
    processes for k > 0; ``process`` = worker processes (also for k = 0: the synchronous
    schedule, same metrics as ``auto``); ``inprocess`` = the asynchronous schedule in the
    trainer's process (debugging; every step exactly k versions stale)."""

    max_steps_off_policy: int = 0
    mode: Literal["auto", "process", "inprocess"] = "auto"
    # worker processes as local OS processes, or as Ray actors (mtrl_jax/rollout/ray_pool.py)
    # on the cluster ray_address (or RAY_ADDRESS) names, else a local one started and stopped
    # by the run; each actor asks for ray_num_cpus CPUs and ray_num_gpus GPUs
    backend: Literal["process", "ray"] = "process"
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    # a worker loads weights that arrive mid-rollout before its next decode call (the
    # episode's later turns record the newer version); admission still counts the start
    partial_rollouts: bool = False
    num_workers: int = 1
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 60.0
    startup_timeout_s: float = 600.0
    max_restarts: int = 20


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    # after the warm-up: ``constant``, or a ``cosine`` / ``linear`` decay that reaches
    # learning_rate x min_lr_ratio at the run's last step (``steps``)
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    mini_batches: int = 1
    epochs: int = 1


@dataclasses.dataclass(frozen=True)
class PackingSection:
    """Episodes are packed as segments into rows of one of ``row_lengths`` (the smallest that
    fits the longest episode); the row count is rounded up (``round_rows``) from ``row_multiple``.
    Episodes whose first ``shared_prefix_min_tokens`` or more tokens are equal (a group's
    prompt) carry that prefix once per row, each episode attending to it (exact: the loss and
    gradients equal flat packing's up to float summation order); 0 packs every episode flat."""

    row_lengths: tuple[int, ...] = (256, 1024, 4096)
    row_multiple: int = 4
    shared_prefix_min_tokens: int = 16
    # the row count: ``pow2`` = row_multiple x 2^j (fewest compiled shapes), ``multiple`` = the
    # next multiple of row_multiple (least padding; a shape per distinct count)
    round_rows: Literal["pow2", "multiple"] = "pow2"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """The device mesh of the train step, ``(data, fsdp, tensor)`` (one axis may be -1: the
    remaining devices), over every process's devices. ``shard``: ``auto`` shards when the job
    runs as several processes (``mtrl train --num-processes N``, or ``MTRL_NUM_PROCESSES``);
    ``always`` also on one process with several devices (e.g. one host's GPUs)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    shard: Literal["auto", "always"] = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    lora: LoRASection = LoRASection()
    data: DataSection = DataSection()
    rollout: RolloutSection = RolloutSection()
    val_sampling_params: ValSamplingSection = ValSamplingSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    async_config: AsyncSection = AsyncSection()
    optimizer: OptimizerSection = OptimizerSection()
    packing: PackingSection = PackingSection()
    mesh: MeshSection = MeshSection()
    steps: int = 100
    eval_interval: int = 25
    checkpoint_interval: int = 50
    trace_samples_per_step: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    experiment_name: str = "mtrl_jax"
    run_name: str | None = None
    # tags set on the tracker's run when it is created (``mlflow.parentRunId`` nests it: sweeps)
    run_tags: dict[str, str] = dataclasses.field(default_factory=dict)
    # where metrics and traces go: an MLflow run (default), memory (tests) or nowhere
    tracker: Literal["mlflow", "jsonl", "memory", "none"] = "mlflow"
    export_merged: bool = False

    def __post_init__(self):
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`load_config` reads back to an equal config."""
        return _to_plain(self)

    @property
    def tis_mode(self) -> str:
        """``algorithm.tis_mode`` with ``auto`` resolved."""
        mode = self.algorithm.tis_mode
        if mode != "auto":
            return mode
        return "truncate" if self.async_config.max_steps_off_policy > 0 else "none"

    @property
    def loss_config(self):
        """The :class:`~mtrl_jax.kernels.LossConfig` every loss of this run is called with."""
        from mtrl_jax.kernels import LossConfig, TISParams

        a = self.algorithm
        return LossConfig(aggregation=a.aggregation, norm_length=a.norm_length,
                          kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                          entropy_coef=a.entropy_coef,
                          tis=TISParams(mode=self.tis_mode, level=a.tis_level, cap=a.tis_cap))


def _to_plain(x):
    if isinstance(x, KernelChoice):
        return _to_plain(x.to_config())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    return x


# ------------------------------------------------------------------------------ validation
#
# Every key of every section has an entry in _RULES: a check of its (already type-checked)
# value that returns a message or None, or None where the type says it all (Literal, bool) or
# a check across keys in _check does the work. Floats must be finite everywhere, kernel
# parameters included. tests/test_config.py asserts that every field has an entry.


def _at_least(lo: int, note: str = ""):
    def check(v):
        return None if v >= lo else f"must be >= {lo}{note}, got {v!r}"
    return check


def _above(lo: int):
    def check(v):
        return None if v > lo else f"must be > {lo}, got {v!r}"
    return check


def _between(lo: int, hi: int, *, open_lo: bool = False, open_hi: bool = False):
    def check(v):
        ok = (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
        return None if ok else (f"must be in {'(' if open_lo else '['}{lo}, {hi}"
                                f"{')' if open_hi else ']'}, got {v!r}")
    return check


def _mesh_axis(v: int):
    return None if v == -1 or v >= 1 else f"must be >= 1 or -1 (the remaining devices), got {v!r}"


def _optional(check):
    return lambda v: None if v is None else check(v)


def _non_empty(v: str):
    return None if v.strip() else "must not be empty"


def _server_urls(v: tuple[str, ...]):
    bad = [u for u in v if not re.fullmatch(r"https?://[^/\s]+/?", u)]
    return f"each must be http://host:port, got {bad}" if bad else None


def _tags(v: dict):
    bad = [k for k, x in v.items() if not isinstance(k, str) or not k or
           not isinstance(x, (str, int, float, bool))]
    return None if not bad else f"tag names must be non-empty strings and values scalars; " \
        f"not {bad}"


#: the LoRA targets the model knows (mtrl_jax.models.lora.LORA_TARGETS; not imported here, so
#: that loading a recipe stays free of the model stack -- a test keeps the two equal)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _lora_targets(v: tuple[str, ...]):
    if not v:
        return f"needs at least one of {list(LORA_TARGETS)}"
    bad = [t for t in v if t not in LORA_TARGETS]
    return f"unknown target(s) {bad}; valid: {list(LORA_TARGETS)}" if bad else None


def _float_dtype(v: str):
    import jax.numpy as jnp

    if v == "auto":
        return None

    try:
        dt = jnp.dtype(v)
    except TypeError:
        return f"{v!r} is not a dtype (e.g. float32, bfloat16, or auto)"
    return None if jnp.issubdtype(dt, jnp.floating) else f"{v!r} is not a floating dtype"


def _aggregation(v: str):
    from mtrl_jax.kernels import AGGREGATIONS

    return None if v in AGGREGATIONS else f"{v!r} is not one of {list(AGGREGATIONS)}"


def _row_lengths(v: tuple[int, ...]):
    if not v:
        return "needs at least one row length"
    return None if all(x >= 1 for x in v) else f"lengths must be >= 1, got {list(v)}"


_NEVER = " (0 = never)"
_RULES: dict[str, Any] = {
    "model.path": _optional(_non_empty),
    "model.tiny": None,  # without model.path: _check_model
    "model.tokenizer": None,  # _check_model
    "model.dtype": _float_dtype,
    "model.param_dtype": _float_dtype,
    "model.remat": None,
    "model.attention": None,
    "model.warmup_checkpoint": _optional(_non_empty),
    "lora.lora_rank": _at_least(1),
    "lora.lora_alpha": _above(0),
    "lora.targets": _lora_targets,
    "data.task": None,  # _check_task
    "data.train_split": _non_empty,
    "data.val_split": _non_empty,
    "data.test_split": _non_empty,
    "data.n_train": _optional(_at_least(1, " (null = the whole split)")),
    "data.n_val": _optional(_at_least(1, " (null = the whole split)")),
    "data.n_test": _optional(_at_least(1, " (null = the whole split)")),
    "data.data_seed": _at_least(0),
    "data.system_prompt": None,
    "data.reward": None,  # _check_task
    "data.imports": None,  # _check_task
    "rollout.batch_size": _at_least(1),
    "rollout.group_size": _at_least(1),  # >= 2 with a group-relative estimator: _check
    "rollout.max_turns": _at_least(1),
    "rollout.sampling_max_tokens": _at_least(1),
    "rollout.max_context_tokens": _at_least(2),
    "rollout.temperature": _at_least(0),
    "rollout.top_p": _between(0, 1, open_lo=True),
    "rollout.top_k": _at_least(0, " (0 = off)"),
    "rollout.simulated_tool_latency_s": _at_least(0),
    "rollout.max_tool_result_bytes": _at_least(256),
    "rollout.max_tool_result_tokens": _at_least(16),
    "rollout.backend": None,  # a Literal: checked by type
    "rollout.servers": _server_urls,
    "rollout.server_timeout_s": _above(0),
    "val_sampling_params.sampling_max_tokens": _at_least(1),
    "val_sampling_params.temperature": _at_least(0),
    "val_sampling_params.num_samples": _at_least(0),
    "val_sampling_params.success_threshold": None,  # any finite reward
    "val_sampling_params.max_disagreement_traces": _at_least(0),
    "algorithm.advantage": None,  # _check_kernels; the parameters check themselves
    "algorithm.loss": None,  # _check_kernels; the parameters check themselves
    "algorithm.aggregation": _aggregation,
    "algorithm.norm_length": _optional(_at_least(1)),
    "algorithm.kl_coef": _at_least(0),
    "algorithm.kl_estimator": None,
    "algorithm.entropy_coef": _at_least(0),
    "algorithm.tis_mode": None,
    "algorithm.tis_level": None,
    "algorithm.tis_cap": None,  # > 0: the kernels' TISParams (_check)
    "algorithm.field_credit": None,  # an episode-level estimator: _check
    "async_config.max_steps_off_policy": _at_least(0),
    "async_config.mode": None,
    "async_config.backend": None,
    "async_config.ray_address": _optional(_non_empty),
    "async_config.ray_num_cpus": _at_least(0),
    "async_config.ray_num_gpus": _at_least(0),
    "async_config.partial_rollouts": None,
    "async_config.num_workers": _at_least(1),
    "async_config.heartbeat_s": _above(0),
    "async_config.heartbeat_timeout_s": _above(0),  # and > heartbeat_s: _check
    "async_config.startup_timeout_s": _above(0),
    "async_config.max_restarts": _at_least(0),
    "optimizer.learning_rate": _above(0),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.max_grad_norm": _at_least(0, " (0 = no clipping)"),
    "optimizer.warmup_steps": _at_least(0),
    "optimizer.decay": None,
    "optimizer.min_lr_ratio": _between(0, 1),
    "optimizer.b1": _between(0, 1, open_hi=True),
    "optimizer.b2": _between(0, 1, open_hi=True),
    "optimizer.mini_batches": _at_least(1),
    "optimizer.epochs": _at_least(1),
    "packing.row_lengths": _row_lengths,
    "packing.row_multiple": _at_least(1),
    "packing.shared_prefix_min_tokens": _at_least(0, " (0 = flat packing)"),
    "packing.round_rows": None,
    "mesh.data": _mesh_axis,
    "mesh.fsdp": _mesh_axis,
    "mesh.tensor": _mesh_axis,
    "mesh.shard": None,
    "rollout.shared_prefix_min_tokens": _at_least(0, " (0 = no shared prefill)"),
    "rollout.tool_specs": None,
    "steps": _at_least(0),
    "eval_interval": _at_least(0, _NEVER),
    "checkpoint_interval": _at_least(0, _NEVER),
    "trace_samples_per_step": _at_least(0),
    "seed": _at_least(0),
    "output_dir": _non_empty,
    "experiment_name": _non_empty,
    "run_name": _optional(_non_empty),
    "run_tags": _tags,
    "tracker": None,
    "export_merged": None,
}

#: estimators that compare the samples of a group with each other: with one sample per group
#: every advantage is 0 (tests/test_config.py checks this list against the kernels)
GROUP_RELATIVE_ESTIMATORS = frozenset({"group_based", "rloo", "grpo_passk",
                                       "group_based_per_turn", "reinforce_pp_baseline", "opo"})


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _not_finite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _check_fields(obj: Any, prefix: str, errors: list[str]) -> None:
    """Types, finite floats and :data:`_RULES` of every field of a section (recursively)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key, tp, value = prefix + f.name, hints[f.name], getattr(obj, f.name)
        if tp is KernelChoice:  # its name and type: _check_kernels; its floats finite here
            params = getattr(value, "params", None)
            if dataclasses.is_dataclass(params) and not isinstance(params, type):
                for p in dataclasses.fields(params):
                    v = getattr(params, p.name)
                    if _not_finite(v):
                        errors.append(f"{key}.{p.name}: must be a finite number, got {v!r}")
            continue
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                _check_fields(value, key + ".", errors)
            else:
                errors.append(f"{key}: expected a {tp.__name__}, got {value!r}")
            continue
        try:
            value = _coerce(tp, value, key)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        if _not_finite(value):
            errors.append(f"{key}: must be a finite number, got {value!r}")
            continue
        rule = _RULES.get(key)
        msg = rule(value) if rule is not None else None
        if msg:
            errors.append(f"{key}: {msg}")


def _check(c: TrainConfig) -> None:
    """Every key's range, then the checks across keys; all problems in one ConfigError."""
    errors: list[str] = []

    def need(ok: bool, key: str, msg: str):
        if not ok:
            errors.append(f"{key}: {msg}")

    _check_fields(c, "", errors)
    # the checks across keys need sane values: they skip keys already named above
    bad = {e.split(":", 1)[0] for e in errors}

    def ok(*keys: str) -> bool:
        return not any(k in bad for k in keys)

    r, a, ac = c.rollout, c.algorithm, c.async_config
    if ok("mesh.data", "mesh.fsdp", "mesh.tensor"):
        m = c.mesh
        need([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh",
             f"at most one axis may be -1, got data={m.data} fsdp={m.fsdp} tensor={m.tensor}")
    if ok("algorithm.aggregation", "algorithm.norm_length", "rollout.max_turns",
          "rollout.sampling_max_tokens"):
        need(a.aggregation != "seq_mean_token_sum_norm" or a.norm_length is not None,
             "algorithm.norm_length",
             "aggregation 'seq_mean_token_sum_norm' divides by a constant length: set it (Dr. "
             "GRPO uses the generation budget; here rollout.max_turns x "
             f"rollout.sampling_max_tokens = {r.max_turns * r.sampling_max_tokens})")
    if ok("async_config.heartbeat_s", "async_config.heartbeat_timeout_s"):
        need(ac.heartbeat_timeout_s > ac.heartbeat_s, "async_config.heartbeat_timeout_s",
             f"must exceed async_config.heartbeat_s ({ac.heartbeat_s!r}), got "
             f"{ac.heartbeat_timeout_s!r}")
    if ok("rollout.max_context_tokens", "packing.row_lengths"):
        need(r.max_context_tokens <= max(c.packing.row_lengths), "rollout.max_context_tokens",
             f"{r.max_context_tokens} exceeds the longest packing row "
             f"(packing.row_lengths max {max(c.packing.row_lengths)}): an episode would not fit "
             "a row")
    if ok("rollout.backend", "rollout.servers"):
        need(r.backend != "server" or bool(r.servers), "rollout.servers",
             "rollout.backend is 'server': list the servers (http://host:port of each "
             "`vllm serve` or `mtrl serve`)")
    _check_model(c, errors, ok)
    kernels_ok = _check_kernels(c, errors, ok)
    if ok("data.imports", "data.task", "data.reward"):
        _check_task(c, errors)
    if ok("algorithm.tis_cap", "algorithm.tis_mode", "algorithm.tis_level",
          "async_config.max_steps_off_policy"):
        from mtrl_jax.kernels import TISParams

        try:
            TISParams(mode=c.tis_mode, level=a.tis_level, cap=a.tis_cap)
        except ValueError as e:
            errors.append(f"algorithm: {e}")
    if kernels_ok and not any(e.startswith(("algorithm", "async_config")) for e in errors):
        try:  # what every loss is called with: the kernels' own checks, last
            c.loss_config  # noqa: B018
        except ValueError as e:
            errors.append(f"algorithm: {e}")
    if errors:
        raise ConfigError(*errors)


def _check_model(c: TrainConfig, errors: list[str], ok) -> None:
    """Without ``model.path`` the run builds ``model.tiny`` with the byte tokenizer."""
    m = c.model
    if m.path is not None or not ok("model.path", "model.tiny", "model.tokenizer"):
        return
    if m.tokenizer != "byte":
        errors.append(f"model.tokenizer: {m.tokenizer!r} needs model.path (a checkpoint "
                      "directory holding that tokenizer, e.g. the demo's warm-up output); "
                      "without model.path use 'byte'")
    tiny = m.tiny
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_position_embeddings"):
        v = tiny.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            errors.append(f"model.tiny.{k}: must be an integer >= 1, got {v!r}")
            return
    heads, kv, hd = tiny.get("num_heads"), tiny.get("num_kv_heads"), tiny.get("head_dim")
    if heads is not None and kv is not None and heads % kv:
        errors.append(f"model.tiny.num_heads: must be a multiple of num_kv_heads ({kv}), "
                      f"got {heads}")
    if hd is not None and hd % 2:
        errors.append(f"model.tiny.head_dim: must be even (RoPE), got {hd}")


def _check_task(c: TrainConfig, errors: list[str]) -> None:
    """``data.imports`` import, ``data.task`` names a known task, ``data.reward`` one of its
    family's reward kinds."""
    from mtrl_jax.envs import families

    try:
        families.import_user_modules(c.data.imports)
    except Exception as e:  # an ImportError, or the module's own error
        errors.append(f"data.imports: {e}")
        return
    try:
        kinds = families.reward_kinds(c.data.task)
    except (KeyError, ValueError, FileNotFoundError) as e:
        errors.append(f"data.task: {e.args[0] if e.args else e}")
        return
    if c.data.reward is not None and c.data.reward not in kinds:
        errors.append(f"data.reward: {c.data.reward!r} is not a reward of {c.data.task}; "
                      f"its family offers {list(kinds)}")


def _check_kernels(c: TrainConfig, errors: list[str], ok) -> bool:
    """The chosen kernels exist, hold their own parameter type, and take only inputs the
    trainer feeds (:data:`mtrl_jax.training.batch.ADVANTAGE_INPUTS`); a group-relative
    estimator gets groups of more than one sample. False when a kernel itself is wrong."""
    from mtrl_jax.training.batch import ADVANTAGE_INPUTS

    for path, kind in CHOICES.items():
        choice = getattr(c.algorithm, path.split(".")[1])
        if not isinstance(choice, KernelChoice):
            errors.append(f"{path}: expected a KernelChoice, got {choice!r}")
            return False
        try:
            entry = _lookup(kind, choice.name, path)
        except ConfigError as e:
            errors.extend(e.errors)
            return False
        if not isinstance(choice.params, entry.params_cls):
            errors.append(f"{path}: {kind} {choice.name!r} takes "
                          f"{entry.params_cls.__name__}, got {type(choice.params).__name__}")
            return False
    adv = c.algorithm.advantage
    est = _registry("advantage").get(adv.name)
    missing = [x for x in est.inputs if x not in ADVANTAGE_INPUTS]
    if missing:
        errors.append(
            f"algorithm.advantage.name: estimator {adv.name!r} needs {missing}, which the "
            f"trainer does not feed (it feeds {sorted(ADVANTAGE_INPUTS)}); choose one of "
            f"{_feedable_estimators(ADVANTAGE_INPUTS)}")
    g = c.rollout.group_size
    if not ok("rollout.group_size"):
        return True
    if g == 1 and adv.name in GROUP_RELATIVE_ESTIMATORS:
        errors.append(f"rollout.group_size: 1 with algorithm.advantage {adv.name!r}, which "
                      "compares the samples of a group with each other: every advantage "
                      "would be 0; use rollout.group_size >= 2")
    k = getattr(adv.params, "k", None)
    if adv.name == "grpo_passk" and k > g:
        errors.append(f"algorithm.advantage.k: pass@{k} needs at least {k} samples per "
                      f"task, but rollout.group_size is {g}")
    elif adv.name == "grpo_passk" and k == g and g > 1:  # the one subset of k is the group
        errors.append(f"algorithm.advantage.k: pass@{k} over groups of exactly {k} samples "
                      "gives every sample the same value, so every advantage would be 0; use "
                      f"k < rollout.group_size ({g})")
    if c.algorithm.field_credit and est.level == "turn":
        errors.append(f"algorithm.field_credit: needs an episode-level estimator (the answer's "
                      f"other tokens keep the episode's advantage); {adv.name!r} gives one per "
                      "turn")
    return True


def _feedable_estimators(feeds) -> list[str]:
    reg = _registry("advantage")
    return [n for n in reg.names() if all(x in feeds for x in reg.get(n).inputs)]


def _lookup(kind: str, name: Any, path: str):
    reg = _registry(kind)
    if not isinstance(name, str) or name not in reg:
        close = difflib.get_close_matches(str(name), reg.names(), n=1, cutoff=0.5)
        hint = f" -- did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}.name: unknown {kind} {name!r}{hint} Valid names: "
                          f"{reg.names()}")
    return reg.get(name)


def _build_choice(kind: str, value: Any, path: str, default: str) -> KernelChoice:
    """``{name: ..., <param>: ...}`` (or a bare name) -> :class:`KernelChoice` with the registry
    entry's own parameter dataclass; unknown or foreign parameters fail naming the key. Without
    a name, the parameters are the ``default`` kernel's."""
    if isinstance(value, KernelChoice):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a name or a mapping {{name: ..., <parameters>}}, "
                          f"got {value!r}")
    name = value.get("name", default)
    entry = _lookup(kind, name, path)
    cls = entry.params_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs, errors = {}, []
    for key, v in value.items():
        if key == "name":
            continue
        if key not in fields:
            reg = _registry(kind)
            owners = [n for n in reg.names()
                      if key in {f.name for f in dataclasses.fields(reg.get(n).params_cls)}]
            whose = f" (a parameter of {owners})" if owners else ""
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
            hint = f" -- did you mean {path + '.' + close[0]!r}?" if close else ""
            errors.append(f"unknown key {path + '.' + key!r}{whose}: {kind} {name!r} takes "
                          f"{sorted(fields) or 'no parameters'}{hint}")
            continue
        try:
            kwargs[key] = _coerce(hints[key], v, f"{path}.{key}")
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        if _not_finite(kwargs[key]):
            errors.append(f"{path}.{key}: must be a finite number, got {kwargs[key]!r}")
    if errors:
        raise ConfigError(*errors)
    try:
        return KernelChoice(name, cls(**kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------ loading


def load_config(recipe: str | os.PathLike | dict[str, Any] | None = None,
                overrides: list[str] | dict[str, Any] | None = None,
                **kw_overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from a recipe (YAML path or dict) and overrides.

    ``kw_overrides`` use ``__`` or ``.`` free names for sections: ``steps=3`` or
    ``rollout={"group_size": 4}``.
    """
    if recipe is None:
        data: dict[str, Any] = {}
    elif isinstance(recipe, dict):
        data = _deep_copy(recipe)
    else:
        path = os.fspath(recipe)
        if not os.path.exists(path):
            raise FileNotFoundError(f"recipe {path!r} not found")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe {path!r}: not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path!r}: the top level must be a mapping")
    errors: list[str] = []
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items += list(overrides.items())
    else:
        for o in overrides or []:
            if "=" not in o:
                errors.append(f"override {o!r} is not key=value (e.g. rollout.group_size=4)")
                continue
            k, v = o.split("=", 1)
            try:
                items.append((k.strip(), yaml.safe_load(v)))
            except yaml.YAMLError as e:
                errors.append(f"{k.strip()}: the value {v!r} is not valid YAML: "
                              f"{_yaml_problem(e)}")
    for k, v in kw_overrides.items():
        items.append((k, v))
    _normalize_choices(data)
    _reset_renamed_choices(data, items)
    for key, value in items:
        _set_dotted(data, key, {"name": value} if key in CHOICES and isinstance(value, str)
                    else value)
    config = _build(TrainConfig, data, "", errors)
    if errors:
        raise ConfigError(*errors)
    return config


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where it is."""
    problem = getattr(e, "problem", None) or str(e)
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    cur: Any = data
    for p in key.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _normalize_choices(data: dict[str, Any]) -> None:
    """A bare kernel name in a recipe (``loss: cispo``) is ``{name: cispo}``."""
    for path in CHOICES:
        value = _get_dotted(data, path)
        if isinstance(value, str):
            _set_dotted(data, path, {"name": value})


def _reset_renamed_choices(data: dict[str, Any], items: list[tuple[str, Any]]) -> None:
    """An override that names another kernel than the recipe's drops the recipe's parameters
    for that kernel: they were set for the kernel the recipe named (see the module doc)."""
    for path in CHOICES:
        new = None
        for key, value in items:
            if key == f"{path}.name":
                new = value
            elif key == path and isinstance(value, str):
                new = value
            elif key == path and isinstance(value, dict) and "name" in value:
                new = value["name"]
        if new is None:
            continue
        block = _get_dotted(data, path)
        old = block.get("name") if isinstance(block, dict) else None
        if old is None:  # the default kernel, with its default parameters
            old = _default_name(path)
        if new != old:
            _set_dotted(data, path, None)  # replace the block, do not merge into it
            _set_dotted(data, path, {"name": new})


def _default_name(path: str) -> str:
    section, field = path.split(".")
    cls = typing.get_type_hints(TrainConfig)[section]
    return getattr(cls(), field).name


def _deep_copy(d):
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    return d


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    if isinstance(value, dict) and isinstance(cur.get(parts[-1]), dict):
        for k, v in value.items():
            _set_dotted(cur[parts[-1]], k, v)
    else:
        cur[parts[-1]] = value


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" -- did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(options)}"


_BAD = object()  # a value that could not be built (its errors are recorded)


def _build(cls, data: Any, prefix: str, errors: list[str] | None = None):
    """``cls`` from a mapping. With ``errors``, every problem is appended there and the build
    goes on (a bad key keeps its default; the result is ``_BAD`` if ``cls`` itself fails);
    without, the problems are raised together as one :class:`ConfigError`."""
    own = errors is None
    errs: list[str] = [] if errors is None else errors
    obj = _build_into(cls, data, prefix, errs)
    if own and errs:
        raise ConfigError(*errs)
    return obj


def _build_into(cls, data: Any, prefix: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
        return _BAD
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in RENAMED_KEYS:
            errors.append(
                f"{path!r} was replaced by {RENAMED_KEYS[path]!r}: a kernel's parameters sit "
                "beside its name, e.g. algorithm: {advantage: {name: group_based, "
                "normalize_by_std: true}, loss: {name: cispo, clip_high: 0.28}} "
                "(see configs/README.md)")
            continue
        if key not in fields:
            full = [f"{prefix}{n}" for n in fields]
            errors.append(f"unknown key {path!r}{_suggest(str(path), full)}")
            continue
        kind = fields[key].metadata.get("registry")
        try:
            if kind:
                default = fields[key].default_factory().name
                v = _build_choice(kind, value, path, default)
            else:
                v = _coerce(hints[key], value, path, errors)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        if v is not _BAD:
            kwargs[key] = v
    try:
        return cls(**kwargs)
    except ConfigError as e:
        errors.extend(e.errors)
    except (TypeError, ValueError) as e:
        errors.append(f"{prefix.rstrip('.') or 'config'}: {e}")
    return _BAD


def _coerce(tp, value: Any, path: str, errors: list[str] | None = None):
    """``value`` as type ``tp`` (a ConfigError naming ``path`` if it is not); a section
    (dataclass) is built with :func:`_build`, collecting into ``errors`` when given."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".", errors)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tried = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                tried.append(e)
        raise tried[0] if tried else ConfigError(f"{path}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, path) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
