"""The synchronous multi-turn RL trainer (``async_config.max_steps_off_policy = 0``).

One step::

    tasks (batch_size, from the shuffled train split; the position is checkpointed)
      -> group_size episodes each through the agent loop, sampled by the embedded JAX sampler
         with the current LoRA weights (a lockstep round: reproducible for a seed)
      -> rewards (the environment's) and strict scores (the external evaluation)
      -> advantages (algorithm.advantage_method) per group
      -> sequence-extension packing: each episode one segment of a fixed-length row
      -> old log-probs (and reference log-probs with adapters off, when KL is on)
      -> epochs x mini_batches optimizer updates of the LoRA parameters only
      -> metrics to MLflow and the console; a sample trajectory as a trace

Every ``eval_interval`` steps the fixed validation split is played greedily (strict task
success, field accuracy, completion) and with ``val_sampling_params.num_samples`` samples per
task (unbiased pass@k); validation trajectories whose reward and strict score disagree are
logged as traces. Checkpoints (orbax) hold the LoRA weights, optimizer state, step, RNG seed and
data position; resuming is exact on CPU. Ctrl-C saves a checkpoint and marks the MLflow run
KILLED.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.families import load_tasks
from mtrl_jax.envs.families import make_env as family_env
from mtrl_jax.kernels import (
    ADVANTAGE_ESTIMATORS,
    GroupBasedParams,
    LossConfig,
    PolicyLossInputs,
    TISParams,
    compute_advantages,
    group_diagnostics,
    pass_at_k,
    policy_loss,
)
from mtrl_jax.kernels.losses import CISPOParams, PPOParams
from mtrl_jax.models.checkpoint import export_peft_adapter, merge_lora, save_model
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.models.lora import split_lora
from mtrl_jax.rollout.agent_loop import AgentLoop
from mtrl_jax.rollout.runner import RolloutRunner, base_fingerprint, build_policy
from mtrl_jax.rollout.trajectory import Trajectory
from mtrl_jax.rollout.worker import InProcessRolloutPool, ProcessRolloutPool
from mtrl_jax.training.checkpointing import CheckpointError, Checkpoints
from mtrl_jax.training.config import TrainConfig, flatten, load_config
from mtrl_jax.training.lora_step import make_lora_train_step
from mtrl_jax.training.packing import Segment, pack
from mtrl_jax.training.tracking import Tracker, default_tracking_uri

__all__ = ["CheckpointError", "MultiTurnRLTrainer", "build_policy"]


def _loss_params(a) -> tuple[str, Any]:
    if a.policy_loss == "ppo":
        return "ppo", PPOParams(clip_low=a.clip_low, clip_high=a.clip_high)
    if a.policy_loss == "cispo":
        return "cispo", CISPOParams(clip_low=a.clip_low, clip_high=a.clip_high)
    return a.policy_loss, None


class MultiTurnRLTrainer:
    """Train a LoRA policy with group-based RL on a task family.

    Args:
      recipe: a YAML recipe path or dict (see :mod:`mtrl_jax.training.config`).
      config: a ready :class:`TrainConfig` (instead of ``recipe``).
      overrides: ``["rollout.group_size=4", ...]`` or ``{"rollout.group_size": 4}``.
      tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or a sqlite file in
        ``output_dir``).
      train_tasks, val_tasks, test_tasks, make_env: a custom environment instead of a task
        family (``make_env(task) -> Environment``, one per episode).
      resume: ``"auto"`` resumes from the newest checkpoint in ``output_dir`` when there is
        one; ``False`` starts fresh (existing checkpoints are left alone but later ones
        overwrite them).
      verbose: print the progress line.
      **kw: more overrides; ``rollout__group_size=4`` means ``rollout.group_size=4``.
    """

    def __init__(self, recipe: str | os.PathLike | dict | None = None, *,
                 config: TrainConfig | None = None,
                 overrides: list[str] | dict[str, Any] | None = None,
                 tracking_uri: str | None = None,
                 train_tasks: Sequence[Task] | None = None,
                 val_tasks: Sequence[Task] | None = None,
                 test_tasks: Sequence[Task] | None = None,
                 make_env: Callable[[Task], Environment] | None = None,
                 resume: bool | str = "auto", verbose: bool = True, **kw):
        if config is None:
            kw = {k.replace("__", "."): v for k, v in kw.items()}
            config = load_config(recipe, overrides, **kw)
        elif recipe is not None or overrides or kw:
            raise ValueError("pass either config= or recipe/overrides, not both")
        c = self.config = config
        self.verbose = verbose
        os.makedirs(c.output_dir, exist_ok=True)
        with open(os.path.join(c.output_dir, "config.json"), "w") as f:
            json.dump(c.to_dict(), f, indent=2)

        # ---- data
        d = c.data
        self.make_env = make_env or family_env
        self.train_tasks = self._prep(train_tasks if train_tasks is not None else
                                      load_tasks(d.task, d.train_split, d.n_train, d.data_seed))
        self.val_tasks = self._prep(val_tasks if val_tasks is not None else
                                    load_tasks(d.task, d.val_split, d.n_val, d.data_seed))
        self._test_tasks = test_tasks
        if not self.train_tasks:
            raise ValueError("no training tasks")
        self._pool = None  # asynchronous rollouts (see async_config)
        if c.steps > 0:
            self._launch_workers()

        try:
            self._build(tracking_uri, resume)
        except BaseException:
            self._stop_pool()  # workers launched above must not outlive a failed constructor
            raise

    def _build(self, tracking_uri: str | None, resume: bool | str) -> None:
        c = self.config
        # ---- model, optimizer, step function
        self.tokenizer, self.model = build_policy(c)
        self.graphdef, self.lora, self.base = split_lora(self.model)
        o = c.optimizer
        self.schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
             optax.constant_schedule(o.learning_rate)], [max(o.warmup_steps, 1)]) \
            if o.warmup_steps > 0 else optax.constant_schedule(o.learning_rate)
        self.tx = optax.chain(
            optax.clip_by_global_norm(o.max_grad_norm) if o.max_grad_norm > 0
            else optax.identity(),
            optax.adamw(self._lr_for_update, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
        self.opt_state = self.tx.init(self.lora)
        self._updates_per_step = o.mini_batches * o.epochs
        self._build_functions()

        # ---- rollouts
        r = c.rollout
        if r.max_context_tokens > max(c.packing.row_lengths):
            raise ValueError(f"rollout.max_context_tokens={r.max_context_tokens} exceeds the "
                             f"longest packing row {max(c.packing.row_lengths)}")
        self.runner = RolloutRunner(c, self.tokenizer, self.model, self.make_env)
        self.sampling = self.runner.sampling
        self.slots = self.runner.slots
        self.sampler = self.runner.sampler
        self.loop, self.val_loop = self.runner.loop, self.runner.val_loop

        # ---- state, checkpoints, tracking
        self.step = 0
        self.data_pos = 0
        self.checkpoints = Checkpoints(os.path.join(c.output_dir, "checkpoints"))
        run_id = None
        if resume and resume != "never":
            meta = self.checkpoints.latest_meta()
            if meta is not None:
                self._restore(meta)
                run_id = meta.get("mlflow_run_id")
        self.tracker = Tracker(tracking_uri or default_tracking_uri(c.output_dir),
                               c.experiment_name, run_name=c.run_name, run_id=run_id)
        self.tracker.log_params(flatten(c.to_dict()))
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ setup helpers

    def _prep(self, tasks: Sequence[Task]) -> list[Task]:
        if self.config.data.system_prompt == "none":
            return [dataclasses.replace(t, system=None) for t in tasks]
        return list(tasks)

    def _lr_for_update(self, count):
        # optax counts updates; the schedule is in trainer steps
        return self.schedule(count // self._updates_per_step)

    def _build_functions(self) -> None:
        c = self.config
        a = c.algorithm
        name, params = _loss_params(a)
        self._tis_mode = a.tis_mode if a.tis_mode != "auto" else (
            "truncate" if c.async_config.max_steps_off_policy > 0 else "none")
        loss_cfg = LossConfig(aggregation=a.aggregation, kl_coef=a.kl_coef,
                              kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
                              tis=TISParams(mode=self._tis_mode, cap=a.tis_cap))
        use_ref = a.kl_coef > 0
        use_tis = self._tis_mode != "none"
        exact_entropy = a.entropy_coef > 0

        def loss_fn(model, batch):
            stats = token_logprobs(model, batch["tokens"], batch["positions"],
                                   batch["segment_ids"], with_entropy=exact_entropy)
            # one on-policy update per step: the old policy is the current one (ratio 1)
            old = batch["old_logprobs"] if "old_logprobs" in batch else \
                jax.lax.stop_gradient(stats.logprobs)
            inputs = PolicyLossInputs(
                logprobs=stats.logprobs, old_logprobs=old,
                advantages=batch["advantages"], loss_mask=batch["loss_mask"],
                segment_ids=batch["segment_ids"],
                behaviour_logprobs=batch["behaviour_logprobs"] if use_tis else None,
                ref_logprobs=batch["ref_logprobs"] if use_ref else None,
                entropy=stats.entropy)
            loss, metrics = policy_loss(name, inputs, params, loss_cfg)
            gap = jnp.abs(jax.lax.stop_gradient(stats.logprobs) - batch["behaviour_logprobs"])
            metrics["behaviour_logprob_gap_max"] = jnp.max(
                jnp.where(batch["loss_mask"] > 0, gap, 0.0))
            return loss, metrics

        self._train_step = make_lora_train_step(self.graphdef, self.tx, loss_fn, donate=False)
        graphdef = self.graphdef

        @jax.jit
        def logprobs_fn(lora, base, tokens, positions, segment_ids):
            model = nnx.merge(graphdef, lora, base)
            return token_logprobs(model, tokens, positions, segment_ids).logprobs

        @jax.jit
        def ref_logprobs_fn(lora, base, tokens, positions, segment_ids):
            model = nnx.merge(graphdef, lora, base)
            return token_logprobs(model, tokens, positions, segment_ids,
                                  use_lora=False).logprobs

        self._logprobs = logprobs_fn
        self._ref_logprobs = ref_logprobs_fn

    # ------------------------------------------------------------------ rollouts

    def _tasks_for(self, step: int, origin: tuple[int, int] | None = None) -> list[Task]:
        """The tasks of training step ``step``: ``batch_size`` positions of the per-epoch
        shuffled train split, counted from ``origin = (step, data_pos)`` (default: now)."""
        n, b = len(self.train_tasks), self.config.rollout.batch_size
        s0, p0 = origin if origin is not None else (self.step, self.data_pos)
        start = p0 + (step - s0) * b
        out = []
        for pos in range(start, start + b):
            epoch, i = divmod(pos, n)
            perm = np.random.default_rng([self.config.seed, epoch]).permutation(n)
            out.append(self.train_tasks[int(perm[i])])
        return out

    def _next_tasks(self) -> list[Task]:
        out = self._tasks_for(self.step)
        self.data_pos += len(out)
        return out

    def run_episodes(self, tasks: Sequence[Task], n: int, key: jax.Array, *,
                     loop: AgentLoop | None = None, tag: str = "ep") -> list[Trajectory]:
        """See :meth:`RolloutRunner.run_episodes`."""
        return self.runner.run_episodes(tasks, n, key, loop=loop, tag=tag)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        c, r = self.config, self.config.rollout
        step = self.step
        t0 = time.perf_counter()
        async_metrics: dict[str, float] = {}
        self._start_pool()
        if self._pool is None:
            tasks = self._next_tasks()
            self.sampler.policy_version = step
            trajs = self.runner.rollout_step(step, tasks)
            info = {"worker": -1, "attempt": 0}
        else:
            admitted, async_metrics = self._pool.get(step)
            tasks = self._next_tasks()
            trajs, info = admitted.payload
            info = {**info, "worker": admitted.worker, "attempt": admitted.attempt}
            if [t.group_id for t in trajs[::r.group_size]] != [t.id for t in tasks]:
                raise RuntimeError(f"step {step}: the rollout's tasks are not the step's tasks")
        t_roll = time.perf_counter() - t0
        self._ledger(step, trajs, info)

        rewards = np.array([t.reward for t in trajs], np.float32).reshape(len(tasks), -1)
        valid = np.array([t.finish_reason != "error" for t in trajs]).reshape(rewards.shape)
        method = c.algorithm.advantage_method
        params = GroupBasedParams(normalize_by_std=c.algorithm.normalize_by_std) \
            if method == "group_based" else None
        if ADVANTAGE_ESTIMATORS.get(method).needs_lengths:
            raise ValueError(f"advantage_method {method!r} (per turn) is not wired into the "
                             "trainer yet")
        adv = np.asarray(compute_advantages(method, jnp.asarray(rewards), jnp.asarray(valid),
                                            params=params))
        diag = {k: float(v) for k, v in group_diagnostics(
            jnp.asarray(rewards), jnp.asarray(adv), jnp.asarray(valid)).items()}
        metrics = self._rollout_metrics(trajs, rewards)
        metrics.update(diag)
        metrics.update(self._staleness_metrics(trajs, step))
        metrics.update(async_metrics)

        t1 = time.perf_counter()
        flat_adv = adv.reshape(-1)
        segments = []
        for i, traj in enumerate(trajs):
            if not valid.reshape(-1)[i]:
                continue
            for s in traj.samples:
                arr = s.arrays()
                segments.append(Segment(arr["tokens"], arr["loss_mask"], arr["logprobs"],
                                        float(flat_adv[i]), index=i))
        train_metrics = self._update(segments)
        metrics.update(train_metrics)
        t_train = time.perf_counter() - t1

        sampled = sum(t.num_sampled_tokens for t in trajs)
        metrics.update({
            "time/rollout_s": t_roll, "time/train_s": t_train,
            "time/step_s": time.perf_counter() - t0,
            # asynchronous: the worker's own rollout time (t_roll is the trainer's wait)
            "throughput/sampled_tokens_per_s": sampled / max(
                async_metrics.get("async/worker_rollout_s", t_roll), 1e-9),
            "throughput/train_tokens_per_s":
                train_metrics.get("train/tokens", 0.0) * self._updates_per_step
                / max(t_train, 1e-9),
            "train/learning_rate": float(self.schedule(step)),
        })
        if self._pool is not None:
            self._pool.publish(step + 1, self.lora)
        self.step += 1
        for traj in trajs[:c.trace_samples_per_step]:
            self.tracker.log_trajectory(traj, step=step, kind="train")
        return metrics

    def _staleness_metrics(self, trajs: list[Trajectory], step: int) -> dict[str, float]:
        """Staleness of each episode used at ``step``: ``step`` minus the policy version its
        first sampled token came from (0 = on-policy); per-token versions are in the samples."""
        k = self.config.async_config.max_steps_off_policy
        st = []
        for t in trajs:
            versions = [v for s in t.samples
                        for v, m in zip(s.policy_version, s.loss_mask, strict=True) if m]
            if versions:
                st.append(step - min(versions))
        if not st:
            return {}
        arr = np.asarray(st)
        m = {"async/staleness/mean": float(arr.mean()), "async/staleness/max": float(arr.max())}
        for j in range(k + 1):
            m[f"async/staleness/hist_{j}"] = float(np.mean(arr == j))
        return m

    def _ledger(self, step: int, trajs: list[Trajectory], info: dict) -> None:
        """One line per consumed step in ``rollout_ledger.jsonl``: which episodes (task sample
        ids) training used, from which worker attempt and policy versions."""
        rec = {"step": step, "worker": info.get("worker"), "attempt": info.get("attempt"),
               "start_version": info.get("start_version"),
               "episodes": [t.episode_id for t in trajs]}
        with open(os.path.join(self.config.output_dir, "rollout_ledger.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _rollout_metrics(self, trajs: list[Trajectory], rewards: np.ndarray,
                         prefix: str = "rollout") -> dict[str, float]:
        turns = np.array([t.num_turns for t in trajs], np.float64)
        resp = [t.num_sampled_tokens for t in trajs]
        total_turns = max(1.0, float(turns.sum()))
        calls = sum(len(t.tool_calls) for t in trajs)
        m = {
            f"{prefix}/reward/mean": float(rewards.mean()),
            f"{prefix}/reward/std": float(rewards.std()),
            f"{prefix}/reward/zero_frac": float((rewards == 0).mean()),
            f"{prefix}/turns/mean": float(turns.mean()),
            f"{prefix}/tokens/response_max": float(max(resp)),
            f"{prefix}/tokens/response_mean": float(np.mean(resp)),
            f"{prefix}/completion_rate": float(np.mean([t.finish_reason == "answered"
                                                        for t in trajs])),
            f"{prefix}/truncated_frac": sum(t.truncated_turns for t in trajs) / total_turns,
            f"{prefix}/max_turns_frac": float(np.mean([t.finish_reason == "max_turns"
                                                       for t in trajs])),
            f"{prefix}/error_frac": float(np.mean([t.finish_reason == "error" for t in trajs])),
            f"{prefix}/tool_calls/mean": calls / len(trajs),
            f"{prefix}/tool_error_rate": sum(t.tool_error_count for t in trajs) / max(1, calls),
            f"{prefix}/format_errors/mean": float(np.mean([t.format_errors for t in trajs])),
            f"{prefix}/template_rewrites": float(sum(t.template_rewrites for t in trajs)),
        }
        strict = [t.strict_score for t in trajs if t.strict_score is not None]
        if strict:
            m[f"{prefix}/task_success_rate"] = float(np.mean(strict))
        return m

    def _update(self, segments: list[Segment]) -> dict[str, float]:
        c = self.config
        o = c.optimizer
        if not segments:
            return {"train/skipped_updates": 0.0, "train/tokens": 0.0}
        batch = pack(segments, c.packing.row_lengths,
                     multiple=max(o.mini_batches, c.packing.row_multiple))
        rows = batch.shape[0]
        mb_rows = rows // o.mini_batches
        arrays = {"tokens": batch.tokens, "positions": batch.positions,
                  "segment_ids": batch.segment_ids, "loss_mask": batch.loss_mask,
                  "advantages": batch.advantages,
                  "behaviour_logprobs": batch.behaviour_logprobs}
        # old (and reference) log-probs, one mini-batch shape at a time; with a single update
        # per step the old policy is the current one and the loss takes it from its own forward
        need_old = self._updates_per_step > 1
        olds, refs = [], []
        for i in range(o.mini_batches):
            sl = slice(i * mb_rows, (i + 1) * mb_rows)
            args = (self.lora, self.base, jnp.asarray(batch.tokens[sl]),
                    jnp.asarray(batch.positions[sl]), jnp.asarray(batch.segment_ids[sl]))
            if need_old:
                olds.append(np.asarray(self._logprobs(*args)))
            if c.algorithm.kl_coef > 0:
                refs.append(np.asarray(self._ref_logprobs(*args)))
        if olds:
            arrays["old_logprobs"] = np.concatenate(olds)
        if refs:
            arrays["ref_logprobs"] = np.concatenate(refs)
        acc: dict[str, list[float]] = {}
        skipped = 0
        for _ in range(o.epochs):
            for i in range(o.mini_batches):
                sl = slice(i * mb_rows, (i + 1) * mb_rows)
                mb = {k: jnp.asarray(v[sl]) for k, v in arrays.items()}
                self.lora, self.opt_state, loss, aux, gnorm = self._train_step(
                    self.lora, self.opt_state, self.base, mb)
                aux = {k: float(v) for k, v in aux.items()}
                skipped += int(aux.pop("skipped", 0.0))
                if not math.isfinite(float(loss)):
                    print(f"[mtrl] step {self.step}: non-finite loss {float(loss)}; update "
                          "skipped", file=sys.stderr)
                for k, v in {"loss": float(loss), "grad_norm": float(gnorm), **aux}.items():
                    acc.setdefault(k, []).append(v)
        if "behaviour_logprob_gap_max" in acc:  # a max, not a mean, over the updates
            acc["behaviour_logprob_gap_max"] = [max(acc["behaviour_logprob_gap_max"])]
        nnx.update(self.model, self.lora)  # the sampler's model
        out = {f"train/{k}": float(np.mean(v)) for k, v in acc.items()}
        out.update({
            "train/skipped_updates": float(skipped),
            "train/packing_efficiency": batch.efficiency,
            "train/rows": float(rows), "train/row_length": float(batch.shape[1]),
            "train/tokens": float(batch.num_tokens),
        })
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str = "val", *, tasks: Sequence[Task] | None = None,
                 step: int | None = None, log_metrics: bool = True,
                 log_traces: bool = True) -> dict[str, float]:
        """Greedy and sampled episodes on a fixed split; returns ``{prefix}/...`` metrics.

        ``split`` ``val`` uses the validation tasks, ``test`` the held-out test split."""
        c = self.config
        v = c.val_sampling_params
        if tasks is None:
            if split == "val":
                tasks = self.val_tasks
            elif split == "test" and self._test_tasks is not None:
                tasks = self._prep(self._test_tasks)
            else:
                d = c.data
                tasks = self._prep(load_tasks(d.task, getattr(d, f"{split}_split", split),
                                              d.n_test if split == "test" else d.n_val,
                                              d.data_seed))
        step = self.step if step is None else step
        prefix = "val" if split == "val" else split
        key = jax.random.fold_in(jax.random.key(c.seed + 7919), 0)  # same for every eval
        saved = self.sampler.params
        try:
            self.sampler.params = dataclasses.replace(
                self.sampling, temperature=0.0, max_tokens=v.sampling_max_tokens)
            greedy = self.run_episodes(tasks, 1, key, loop=self.val_loop, tag=f"{prefix}g")
            sampled: list[Trajectory] = []
            if v.num_samples > 0:
                self.sampler.params = dataclasses.replace(
                    self.sampling, temperature=v.temperature, max_tokens=v.sampling_max_tokens)
                sampled = self.run_episodes(tasks, v.num_samples, jax.random.fold_in(key, 1),
                                            loop=self.val_loop, tag=f"{prefix}s")
        finally:
            self.sampler.params = saved
        rewards = np.array([t.reward for t in greedy], np.float32)
        m = self._rollout_metrics(greedy, rewards, prefix=prefix)
        strict = [t.strict_score for t in greedy if t.strict_score is not None]
        m[f"{prefix}/task_success_rate"] = float(np.mean(strict)) if strict else float("nan")
        accs = [t.reward_metrics.get("field_acc") for t in greedy]
        accs = [a for a in accs if a is not None]
        if accs:
            m[f"{prefix}/field_acc"] = float(np.mean(accs))
        fields = sorted({k for t in greedy for k in t.reward_metrics if k.startswith("field/")})
        for f in fields:
            m[f"{prefix}/{f}"] = float(np.mean([t.reward_metrics.get(f, 0.0) for t in greedy]))
        if sampled:
            thr = v.success_threshold
            ok = np.array([t.reward >= thr for t in sampled]).reshape(len(tasks), -1)
            n = ok.shape[1]
            for k in sorted({1, n} | ({8} if n >= 8 else set())):
                m[f"{prefix}/reward/pass_k_{k}"] = float(np.mean(
                    [pass_at_k(n, int(row.sum()), k) for row in ok]))
            m[f"{prefix}/sampled_task_success_rate"] = float(np.mean(
                [t.strict_score or 0.0 for t in sampled]))
            m[f"{prefix}/sampled_reward/mean"] = float(np.mean([t.reward for t in sampled]))
        thr = v.success_threshold
        disagree = [t for t in greedy + sampled if t.strict_score is not None
                    and (t.reward >= thr) != (t.strict_score >= 1.0)]
        m[f"{prefix}/reward_strict_disagreements"] = float(len(disagree))
        self.last_eval = {"greedy": greedy, "sampled": sampled, "disagree": disagree}
        if log_traces:
            for t in disagree[:v.max_disagreement_traces]:
                self.tracker.log_trajectory(t, step=step, kind=f"{prefix}_disagreement")
        if log_metrics:
            self.tracker.log_metrics(m, step)
        return m

    # ------------------------------------------------------------------ the run

    def train(self) -> list[dict[str, float]]:
        """Run to ``config.steps`` (from the restored step when resuming); returns the metric
        history of the steps run here."""
        c = self.config
        status = "FINISHED"
        try:
            if c.eval_interval and self.step == 0 and not self._has_val(0):
                self._log_eval(self.evaluate("val", step=0))
            if self.step < c.steps:
                self._start_pool()
            while self.step < c.steps:
                metrics = self.train_step()
                step = self.step  # steps done
                if c.eval_interval and step % c.eval_interval == 0:
                    metrics.update(self.evaluate("val", step=step, log_metrics=False))
                self.tracker.log_metrics(metrics, step)
                self.history.append(metrics)
                self._progress(metrics)
                if c.checkpoint_interval and step % c.checkpoint_interval == 0:
                    self.save_checkpoint()
            if c.steps and self.checkpoints.latest_step() != self.step:
                self.save_checkpoint()
            self.export()
        except KeyboardInterrupt:
            status = "KILLED"
            print(f"\n[mtrl] interrupted at step {self.step}: saving a checkpoint",
                  file=sys.stderr)
            self.save_checkpoint()
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._stop_pool()
            self.tracker.end(status)
        return self.history

    def _start_pool(self) -> None:
        """The asynchronous rollout pool, when the config asks for one (see ``async_config``);
        a no-op once started."""
        if self._pool is not None and self._pool.started:
            return
        a = self.config.async_config
        mode = a.mode
        if mode == "auto":
            mode = "process" if a.max_steps_off_policy > 0 else None
        if mode is None:
            return
        origin = (self.step, self.data_pos)  # fixed: the pool's thread calls it during steps

        def tasks_for(step: int) -> list[Task]:
            return self._tasks_for(step, origin)

        if mode == "inprocess":
            self._pool = InProcessRolloutPool(self.config, tasks_for, self.runner,
                                              first_step=self.step, last_step=self.config.steps)
            self._pool.start(self.step, self.lora)
            return
        if self._pool is None:
            self._launch_workers()
        self._pool.start(self.step, self.lora, tasks_for=tasks_for, first_step=self.step,
                         last_step=self.config.steps,
                         base_fingerprint=base_fingerprint(self.model))

    def _launch_workers(self) -> None:
        """Start rollout worker processes now (when the config asks for them): they boot and
        build the base while the trainer builds its own state."""
        a = self.config.async_config
        if a.mode == "process" or (a.mode == "auto" and a.max_steps_off_policy > 0):
            self._pool = ProcessRolloutPool(
                self.config, make_env=None if self.make_env is family_env else self.make_env,
                scratch_root=os.path.join(self.config.output_dir, "rollout_workers"))
            self._pool.launch()

    def _stop_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def _has_val(self, step: int) -> bool:
        hist = self.tracker.client.get_metric_history(self.tracker.run_id,
                                                      "val/task_success_rate")
        return any(m.step == step for m in hist)

    def _log_eval(self, m: dict[str, float]) -> None:
        if self.verbose:
            print(f"[mtrl] step {self.step:>4} | val success "
                  f"{m.get('val/task_success_rate', float('nan')):.3f} | val reward "
                  f"{m.get('val/reward/mean', float('nan')):.3f}", flush=True)

    def _progress(self, m: dict[str, float]) -> None:
        if not self.verbose:
            return
        val = m.get("val/task_success_rate")
        val_s = f" | val success {val:.3f}" if val is not None else ""
        print(f"[mtrl] step {self.step:>4}/{self.config.steps} | reward "
              f"{m['rollout/reward/mean']:.3f} | success "
              f"{m.get('rollout/task_success_rate', float('nan')):.3f}{val_s} | "
              f"{m['throughput/sampled_tokens_per_s']:.0f} sampled tok/s, "
              f"{m['throughput/train_tokens_per_s']:.0f} train tok/s | "
              + (f"rollout wait {m['async/wait_s']:.1f}s (staleness "
                 f"{m.get('async/staleness/mean', 0.0):.1f})" if "async/wait_s" in m
                 else f"rollout {m['time/rollout_s']:.1f}s")
              + f" train {m['time/train_s']:.1f}s", flush=True)

    def get_mlflow_url(self) -> str:
        return self.tracker.url()

    # ------------------------------------------------------------------ checkpoints, export

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"model": dataclasses.asdict(c.model), "lora": dataclasses.asdict(c.lora),
                "optimizer": dataclasses.asdict(c.optimizer)}

    def save_checkpoint(self) -> str:
        meta = {"step": self.step, "data_pos": self.data_pos, "seed": self.config.seed,
                "mlflow_run_id": getattr(getattr(self, "tracker", None), "run_id", None),
                "fingerprint": json.loads(json.dumps(self._fingerprint()))}
        return self.checkpoints.save(self.step, (self.lora, self.opt_state), meta)

    def _restore(self, meta: dict[str, Any]) -> None:
        fp = json.loads(json.dumps(self._fingerprint()))
        old = meta.get("fingerprint", {})
        diffs = [f"{sec}.{k}: checkpoint {old.get(sec, {}).get(k)!r} vs config {v!r}"
                 for sec in ("model", "lora") for k, v in fp[sec].items()
                 if old.get(sec, {}).get(k) != v]
        if diffs:
            raise CheckpointError(
                f"checkpoint step {meta['step']} in {self.checkpoints.directory} is "
                "incompatible with this config: " + "; ".join(diffs))
        self.lora, self.opt_state = self.checkpoints.restore(
            meta["step"], (self.lora, self.opt_state))
        nnx.update(self.model, self.lora)
        self.step = int(meta["step"])
        self.data_pos = int(meta["data_pos"])
        if self.verbose:
            print(f"[mtrl] resumed from step {self.step} ({self.checkpoints.directory})",
                  flush=True)

    def export(self) -> dict[str, str]:
        """Write the PEFT adapter (and the merged checkpoint when ``export_merged``)."""
        out = {}
        adapter = os.path.join(self.config.output_dir, "adapter")
        export_peft_adapter(self.model, adapter,
                            base_model_name_or_path=self.config.model.path)
        out["adapter"] = adapter
        if self.config.export_merged:
            merged_dir = os.path.join(self.config.output_dir, "merged")
            save_model(merge_lora(self.model), merged_dir)
            self.tokenizer.save_pretrained(merged_dir)
            out["merged"] = merged_dir
        return out

    def close(self) -> None:
        self._stop_pool()
        self.runner.close()

