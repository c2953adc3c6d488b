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
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """``path``: a local HF checkpoint directory (config.json, safetensors, tokenizer). Without
    it, ``tiny`` builds a small random model (dict of :class:`~mtrl_jax.models.ModelConfig`
    fields) and ``tokenizer`` names a built-in tokenizer (``byte`` or ``demo_words``)."""

    path: str | None = None
    tiny: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, tie_word_embeddings=True))
    tokenizer: str = "byte"
    dtype: str = "float32"
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
    = ``truncate`` when ``async_config.max_steps_off_policy > 0``, else ``none``)."""

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
    b1: float = 0.9
    b2: float = 0.99
    mini_batches: int = 1
    epochs: int = 1


@dataclasses.dataclass(frozen=True)
class PackingSection:
    """Episodes are packed as segments into rows of one of ``row_lengths`` (the smallest that
    fits the longest episode); the row count is rounded up to a multiple of ``row_multiple``."""

    row_lengths: tuple[int, ...] = (256, 1024, 4096)
    row_multiple: int = 4


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
    steps: int = 100
    eval_interval: int = 25
    checkpoint_interval: int = 50
    trace_samples_per_step: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    experiment_name: str = "mtrl_jax"
    run_name: str | None = None
    # where metrics and traces go: an MLflow run (default), memory (tests) or nowhere
    tracker: Literal["mlflow", "memory", "none"] = "mlflow"
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


def _check(c: TrainConfig) -> None:
    from mtrl_jax.kernels import AGGREGATIONS

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    r = c.rollout
    need(r.batch_size >= 1, "rollout.batch_size", "must be >= 1")
    need(r.group_size >= 1, "rollout.group_size", "must be >= 1")
    need(r.max_turns >= 1, "rollout.max_turns", "must be >= 1")
    need(r.sampling_max_tokens >= 1, "rollout.sampling_max_tokens", "must be >= 1")
    need(r.temperature >= 0, "rollout.temperature", "must be >= 0")
    need(c.steps >= 0, "steps", "must be >= 0")
    need(c.eval_interval >= 0 and c.checkpoint_interval >= 0, "eval_interval",
         "intervals must be >= 0 (0 = never)")
    a = c.algorithm
    need(a.aggregation in AGGREGATIONS, "algorithm.aggregation",
         f"{a.aggregation!r} is not one of {list(AGGREGATIONS)}")
    need(a.aggregation != "seq_mean_token_sum_norm" or (a.norm_length or 0) > 0,
         "algorithm.norm_length",
         "aggregation 'seq_mean_token_sum_norm' divides by a constant length: set it (Dr. "
         "GRPO uses the generation budget; here rollout.max_turns x "
         f"rollout.sampling_max_tokens = {r.max_turns * r.sampling_max_tokens})")
    need(a.norm_length is None or a.norm_length > 0, "algorithm.norm_length", "must be > 0")
    _check_kernels(c)
    _check_task(c)
    try:
        c.loss_config  # noqa: B018 -- builds (and so validates) the kernels' LossConfig
    except ValueError as e:
        raise ConfigError(f"algorithm: {e}") from None
    o = c.optimizer
    need(o.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
    need(o.mini_batches >= 1 and o.epochs >= 1, "optimizer.mini_batches",
         "mini_batches and epochs must be >= 1")
    need(c.lora.lora_rank >= 1, "lora.lora_rank", "must be >= 1")
    need(c.async_config.max_steps_off_policy >= 0, "async_config.max_steps_off_policy",
         "must be >= 0")
    ac = c.async_config
    need(ac.num_workers >= 1, "async_config.num_workers", "must be >= 1")
    need(ac.heartbeat_s > 0 and ac.heartbeat_timeout_s > ac.heartbeat_s,
         "async_config.heartbeat_timeout_s", "must exceed heartbeat_s (> 0)")
    need(ac.max_restarts >= 0, "async_config.max_restarts", "must be >= 0")
    need(c.rollout.simulated_tool_latency_s >= 0, "rollout.simulated_tool_latency_s",
         "must be >= 0")
    need(c.val_sampling_params.num_samples >= 0, "val_sampling_params.num_samples", ">= 0")
    need(len(c.packing.row_lengths) > 0 and all(x > 0 for x in c.packing.row_lengths),
         "packing.row_lengths", "needs positive lengths")
    need(c.model.path is not None or c.model.tokenizer in ("byte", "demo_words"),
         "model.tokenizer", "without model.path use 'byte' or 'demo_words'")


def _check_task(c: TrainConfig) -> None:
    """``data.imports`` import, ``data.task`` names a known task, ``data.reward`` one of its
    family's reward kinds."""
    from mtrl_jax.envs import families

    try:
        families.import_user_modules(c.data.imports)
    except Exception as e:  # an ImportError, or the module's own error
        raise ConfigError(f"data.imports: {e}") from e
    try:
        kinds = families.reward_kinds(c.data.task)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.task: {e.args[0] if e.args else e}") from None
    if c.data.reward is not None and c.data.reward not in kinds:
        raise ConfigError(f"data.reward: {c.data.reward!r} is not a reward of {c.data.task}; "
                          f"its family offers {list(kinds)}")


def _check_kernels(c: TrainConfig) -> None:
    """The chosen kernels exist, hold their own parameter type, and take only inputs the
    trainer feeds (:data:`mtrl_jax.training.batch.ADVANTAGE_INPUTS`)."""
    from mtrl_jax.training.batch import ADVANTAGE_INPUTS

    for path, kind in CHOICES.items():
        choice = getattr(c.algorithm, path.split(".")[1])
        if not isinstance(choice, KernelChoice):
            raise ConfigError(f"{path}: expected a KernelChoice, got {choice!r}")
        entry = _lookup(kind, choice.name, path)
        if not isinstance(choice.params, entry.params_cls):
            raise ConfigError(f"{path}: {kind} {choice.name!r} takes "
                              f"{entry.params_cls.__name__}, got {type(choice.params).__name__}")
    adv = c.algorithm.advantage
    est = _registry("advantage").get(adv.name)
    missing = [x for x in est.inputs if x not in ADVANTAGE_INPUTS]
    if missing:
        raise ConfigError(
            f"algorithm.advantage.name: estimator {adv.name!r} needs {missing}, which the "
            f"trainer does not feed (it feeds {sorted(ADVANTAGE_INPUTS)}); choose one of "
            f"{_feedable_estimators(ADVANTAGE_INPUTS)}")
    k = getattr(adv.params, "k", None)
    if adv.name == "grpo_passk" and k > c.rollout.group_size:
        raise ConfigError(f"algorithm.advantage.k: pass@{k} needs at least {k} samples per "
                          f"task, but rollout.group_size is {c.rollout.group_size}")


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
    hints = typing.get_type_hints(cls)
    kwargs = {}
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
            raise ConfigError(f"unknown key {path + '.' + key!r}{whose}: {kind} {name!r} takes "
                              f"{sorted(fields) or 'no parameters'}{hint}")
        kwargs[key] = _coerce(hints[key], v, f"{path}.{key}")
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
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path!r}: the top level must be a mapping")
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items += list(overrides.items())
    else:
        for o in overrides or []:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not key=value (e.g. rollout.group_size=4)")
            k, v = o.split("=", 1)
            items.append((k.strip(), yaml.safe_load(v)))
    for k, v in kw_overrides.items():
        items.append((k, v))
    _normalize_choices(data)
    _reset_renamed_choices(data, items)
    for key, value in items:
        _set_dotted(data, key, {"name": value} if key in CHOICES and isinstance(value, str)
                    else value)
    return _build(TrainConfig, data, "")


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


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in RENAMED_KEYS:
            raise ConfigError(
                f"{path!r} was replaced by {RENAMED_KEYS[path]!r}: a kernel's parameters sit "
                "beside its name, e.g. algorithm: {advantage: {name: group_based, "
                "normalize_by_std: true}, loss: {name: cispo, clip_high: 0.28}} "
                "(see configs/README.md)")
        if key not in fields:
            full = [f"{prefix}{n}" for n in fields]
            raise ConfigError(f"unknown key {path!r}{_suggest(path, full)}")
        kind = fields[key].metadata.get("registry")
        if kind:
            default = fields[key].default_factory().name
            kwargs[key] = _build_choice(kind, value, path, default)
        else:
            kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _coerce(tp, value: Any, path: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
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
