"""The multi-turn RL trainer: the loop, built from parts.

One step (:meth:`MultiTurnRLTrainer.train_step`), top to bottom::

    rollouts     the step's episodes from the rollout source (synchronous, in-process or
                 worker processes: rollout/sources.py), group_size per task of the step
    rewards      the environment's (sequence and per-turn) and the strict scores, per group
    advantages   the recipe's estimator with its parameters (training/batch.py)
    batch        each valid episode one segment of fixed-length packed rows
    update       epochs x mini_batches LoRA optimizer steps with the recipe's loss
                 (training/update.py)
    publish      the new policy version's LoRA weights to the rollout source
    metrics      to the tracker (MLflow by default) and the console; a sample trajectory as a
                 trace

Every ``eval_interval`` steps the fixed validation split is played and scored by
:mod:`mtrl_jax.evaluation.metrics` (the same play and definitions as ``mtrl eval``); episodes
whose reward and strict score disagree are logged as traces. Checkpoints (orbax) hold the LoRA
weights, optimizer state, step, RNG seed and data position; resuming is exact on CPU.

Interruption: a step's results (weights, optimizer state, step counter, data position, ledger
line, metrics) are committed together at its end, so SIGINT (Ctrl-C) or SIGTERM at any point --
rollouts, update, validation, checkpoint write -- saves a checkpoint of the last committed step
(a signal during the commit or a checkpoint write is held until it is done), marks the run
KILLED, and a resume replays exactly the steps that were lost. Resume skips a newest checkpoint
that is incomplete or unreadable (with a message) and uses the previous one.

One run per output folder: the trainer holds ``<output_dir>/.mtrl.lock`` while it lives (see
:mod:`mtrl_jax.training.run_lock`); a fresh start (``resume=False``) over a folder that holds
another run's checkpoints is refused unless ``on_existing`` says to archive or overwrite them.

The trainer's ``lora`` is the one source of truth of the policy's weights: the rollout source
and the trainer's own sampler (validation, export) receive copies of each version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from mtrl_jax.config import TrainConfig, flatten, load_config
from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.families import load_tasks
from mtrl_jax.evaluation.metrics import disagrees, episode_metrics, play_metrics, play_task_set
from mtrl_jax.kernels import group_diagnostics
from mtrl_jax.kernels.advantages import GroupBasedParams
from mtrl_jax.models.checkpoint import export_peft_adapter, merge_lora, save_model
from mtrl_jax.models.lora import split_lora
from mtrl_jax.rollout.runner import RolloutRunner, base_fingerprint, build_policy
from mtrl_jax.rollout.sources import RolloutSource, StepRollout, make_rollout_source
from mtrl_jax.rollout.trajectory import Trajectory
from mtrl_jax.tracking import make_tracker
from mtrl_jax.training import distributed, run_lock
from mtrl_jax.training.batch import (
    advantage_inputs,
    compute_step_advantages,
    episode_segments,
    pack_for_update,
)
from mtrl_jax.training.checkpointing import CheckpointError, Checkpoints, IncompatibleCheckpoint
from mtrl_jax.training.field_credit import apply_field_credit
from mtrl_jax.training.run_lock import RunLockError
from mtrl_jax.training.update import Updater, make_optimizer

__all__ = ["CheckpointError", "MultiTurnRLTrainer", "RunLockError", "TrainingInterrupted",
           "build_policy"]

#: what a fresh start (resume=False) moves away from its output folder
_RUN_FILES = ("checkpoints", "checkpoints_unusable", "rollout_ledger.jsonl", "adapter", "merged",
              "config.json")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :meth:`MultiTurnRLTrainer.train` (a checkpoint was saved)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM raise :class:`TrainingInterrupted` where the trainer can stop at once;
    inside :meth:`held` (a step's commit, a checkpoint write) they wait until it is done."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # Python delivers signals to the main thread only
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
            return
        raise TrainingInterrupted(signum)

    @contextlib.contextmanager
    def held(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise TrainingInterrupted(signum)


class MultiTurnRLTrainer:
    """Train a LoRA policy with group-based RL on a task family.

    Args:
      recipe: a YAML recipe path or dict (see :mod:`mtrl_jax.config`).
      config: a ready :class:`TrainConfig` (instead of ``recipe``).
      overrides: ``["rollout.group_size=4", ...]`` or ``{"rollout.group_size": 4}``.
      tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or a sqlite file in
        ``output_dir``); used when the recipe's ``tracker`` is ``mlflow``.
      train_tasks, val_tasks, test_tasks, make_env: a custom environment instead of a task
        family (``make_env(task) -> Environment``, one per episode).
      rollout_source: a ready :class:`~mtrl_jax.rollout.sources.RolloutSource` instead of the
        one the recipe chooses (e.g. replayed episodes in tests).
      resume: ``"auto"`` resumes from the newest usable checkpoint in ``output_dir`` when
        there is one; ``False`` starts fresh at step 0.
      on_existing: what a fresh start (``resume=False``) does with another run's checkpoints
        in ``output_dir``: ``"refuse"`` (raise :class:`RunLockError` saying so), ``"archive"``
        (move that run's checkpoints, ledger, adapter and config to
        ``output_dir/archive/<UTC time>/``) or ``"overwrite"`` (delete them).
      verbose: print progress lines.
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
                 rollout_source: RolloutSource | None = None,
                 resume: bool | str = "auto",
                 on_existing: Literal["refuse", "archive", "overwrite"] = "refuse",
                 verbose: bool = True, **kw):
        if config is None:
            kw = {k.replace("__", "."): v for k, v in kw.items()}
            config = load_config(recipe, overrides, **kw)
        elif recipe is not None or overrides or kw:
            raise ValueError("pass either config= or recipe/overrides, not both")
        c = self.config = config
        self.verbose = verbose
        if make_env is not None and c.data.reward is not None:
            raise ValueError("data.reward chooses among a task family's rewards; a custom "
                             "make_env defines its own reward (leave data.reward unset)")
        if on_existing not in ("refuse", "archive", "overwrite"):
            raise ValueError(f"on_existing must be 'refuse', 'archive' or 'overwrite', got "
                             f"{on_existing!r}")
        self._signals = _Signals()
        run_lock.acquire(c.output_dir, say=self._say)
        try:
            if not resume or resume == "never":
                self._clear_old_run(on_existing)
            with open(os.path.join(c.output_dir, "config.json"), "w") as f:
                json.dump(c.to_dict(), f, indent=2)
        except BaseException:
            run_lock.release(c.output_dir)
            raise

        d = c.data
        self.make_env = make_env
        self.train_tasks = self._prep(train_tasks if train_tasks is not None else
                                      load_tasks(d.task, d.train_split, d.n_train, d.data_seed))
        self.val_tasks = self._prep(val_tasks if val_tasks is not None else
                                    load_tasks(d.task, d.val_split, d.n_val, d.data_seed))
        self._test_tasks = test_tasks
        if not self.train_tasks:
            raise ValueError("no training tasks")
        # the source first: rollout worker processes boot while the trainer builds its model
        self.source = rollout_source or make_rollout_source(c, lambda: self.runner,
                                                            make_env=make_env)
        self._source_started = False
        try:
            self._build(tracking_uri, resume)
        except BaseException:
            self.source.close()  # workers launched above must not outlive a failed constructor
            run_lock.release(c.output_dir)
            raise

    def _clear_old_run(self, on_existing: str) -> None:
        """A fresh start: another run's checkpoints must not be resumed by a later plain run."""
        out = self.config.output_dir
        ck = Checkpoints(os.path.join(out, "checkpoints"))
        steps = ck.steps()
        if not steps:
            return
        if on_existing == "refuse":
            raise RunLockError(
                f"output_dir {out} holds another run's checkpoints (steps {steps}); a fresh "
                "start would mix with them and a later resume would pick up the wrong run. "
                "Resume it instead (drop --no-resume / resume=False), use another output_dir, "
                "or pass --archive-old (on_existing='archive') or --overwrite "
                "(on_existing='overwrite').")
        if on_existing == "archive":
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
            dest = os.path.join(out, "archive", stamp)
            os.makedirs(dest, exist_ok=True)
            for name in _RUN_FILES:
                if os.path.exists(os.path.join(out, name)):
                    shutil.move(os.path.join(out, name), os.path.join(dest, name))
            self._say(f"archived the previous run's checkpoints (steps {steps}) to {dest}")
        else:
            for name in _RUN_FILES:
                p = os.path.join(out, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
            self._say(f"deleted the previous run's checkpoints (steps {steps}) in {out}")

    def _build(self, tracking_uri: str | None, resume: bool | str) -> None:
        c = self.config
        self.tokenizer, model = build_policy(c)
        self.graphdef, self.lora, self.base = split_lora(model)
        self.tx, self.schedule = make_optimizer(c)
        self.opt_state = self.tx.init(self.lora)
        if distributed.wants_sharding(c):
            # the train step on the mesh of every process's devices; process 0 (this trainer)
            # keeps host copies of the state for its sampler, checkpoints and exports
            self.updater = distributed.ShardedUpdater(c)
        else:
            self.updater = Updater(self.graphdef, self.tx, c)
        # the trainer's own sampler: synchronous rollouts, validation, export
        self.runner = RolloutRunner(c, self.tokenizer, model, self.make_env)

        self.step = 0
        self.data_pos = 0
        self.checkpoints = Checkpoints(os.path.join(c.output_dir, "checkpoints"))
        run_id = None
        if resume and resume != "never":
            found = self.checkpoints.restore_latest((self.lora, self.opt_state),
                                                    check=self._check_fingerprint,
                                                    say=self._say)
            if found is not None:
                meta, (self.lora, self.opt_state) = found
                self.step = int(meta["step"])
                self.data_pos = int(meta["data_pos"])
                run_id = meta.get("run_id", meta.get("mlflow_run_id"))
                self._trim_ledger()
                self._say(f"resumed from step {self.step} ({self.checkpoints.directory})")
        self.tracker = make_tracker(c.tracker, output_dir=c.output_dir,
                                    experiment_name=c.experiment_name, run_name=c.run_name,
                                    run_id=run_id, tracking_uri=tracking_uri,
                                    tags=dict(c.run_tags))
        self.tracker.log_params(flatten(c.to_dict()))
        self.history: list[dict[str, float]] = []

    @property
    def model(self):
        """The policy as a module, holding the current weights."""
        self._runner_weights_current()
        return self.runner.sampler.model

    def _prep(self, tasks: Sequence[Task]) -> list[Task]:
        if self.config.data.system_prompt == "none":
            return [dataclasses.replace(t, system=None) for t in tasks]
        return list(tasks)

    def _say(self, line: str) -> None:
        if self.verbose:
            print(f"[mtrl] {line}", flush=True)

    # ------------------------------------------------------------------ data

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

    def _start_source(self) -> None:
        if self._source_started:
            return
        origin = (self.step, self.data_pos)  # fixed: a pool's thread calls it during steps
        self.source.start(self.step, self.lora, tasks_for=lambda s: self._tasks_for(s, origin),
                          first_step=self.step, last_step=self.config.steps,
                          base_fingerprint=lambda: base_fingerprint(self.runner.sampler.model))
        self._source_started = True

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        """One step of the loop (see the module docstring); logs and returns its metrics.

        Nothing of the trainer's state changes until the step's end, where weights, optimizer
        state, step, data position, ledger line and metrics are committed together."""
        c = self.config
        step = self.step
        t0 = time.perf_counter()
        self._start_source()

        # rollouts
        roll = self.source.episodes(step)
        tasks = self._tasks_for(step)
        trajs = roll.trajectories
        if [t.group_id for t in trajs[::c.rollout.group_size]] != [t.id for t in tasks]:
            raise RuntimeError(f"step {step}: the rollout's tasks are not the step's tasks")
        t_roll = time.perf_counter() - t0

        # rewards -> advantages
        inputs = advantage_inputs(trajs, c.rollout.group_size)
        adv = compute_step_advantages(inputs, c.algorithm.advantage.name,
                                      c.algorithm.advantage.params)

        # batch -> update
        t1 = time.perf_counter()
        segments = episode_segments(trajs, adv, inputs.valid)
        credit_metrics: dict[str, float] = {}
        if c.algorithm.field_credit:
            segments, credit_metrics = apply_field_credit(
                segments, trajs, inputs.valid, self._decode, self._field_params())
        if segments:
            batch = pack_for_update(
                segments, c.packing.row_lengths, row_multiple=c.packing.row_multiple,
                mini_batches=c.optimizer.mini_batches,
                shared_prefix_min_tokens=c.packing.shared_prefix_min_tokens,
                round_rows=c.packing.round_rows)
            lora, opt_state, train_metrics = self.updater(
                self.lora, self.opt_state, self.base, batch)
        else:  # every episode failed: nothing to learn from
            lora, opt_state = self.lora, self.opt_state
            train_metrics = {"train/skipped_updates": 0.0, "train/tokens": 0.0}
        t_train = time.perf_counter() - t1

        # metrics
        metrics = {f"rollout/{k}": v for k, v in episode_metrics(trajs).items()}
        metrics.update({k: float(v) for k, v in group_diagnostics(
            inputs.rewards, adv, inputs.valid).items()})
        metrics.update(self._staleness_metrics(trajs, step))
        metrics.update(roll.metrics)
        metrics.update(train_metrics)
        metrics.update(credit_metrics)
        sampled = sum(t.num_sampled_tokens for t in trajs)
        metrics.update({
            "time/rollout_s": t_roll, "time/train_s": t_train,
            "time/step_s": time.perf_counter() - t0,
            # totals (compute-matched comparisons: sweeps sum them over a run)
            "rollout/sampled_tokens": float(sampled),
            "throughput/sampled_tokens_per_s": sampled / max(roll.seconds, 1e-9),
            # each epoch passes every packed token once, whatever the mini-batch split
            "throughput/train_tokens_per_s":
                train_metrics.get("train/tokens", 0.0) * c.optimizer.epochs
                / max(t_train, 1e-9),
            "train/learning_rate": float(self.schedule(step)),
        })
        if "worker" in roll.info and roll.info["worker"] != -1:
            metrics["async/worker_rollout_s"] = roll.seconds

        # commit the step and publish the new version (a signal waits until it is done)
        with self._signals.held():
            self.lora, self.opt_state = lora, opt_state
            self.step = step + 1
            self.data_pos += len(tasks)
            self._ledger(step, roll)
            self.tracker.log_metrics(metrics, self.step)
            for traj in trajs[:c.trace_samples_per_step]:
                self.tracker.log_trajectory(traj, step=step, kind="train")
            self.history.append(metrics)
            self.source.publish(self.step, self.lora)
        return metrics

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _field_params(self) -> GroupBasedParams:
        """Field credit normalises as the recipe's estimator does where it says how."""
        p = self.config.algorithm.advantage.params
        if isinstance(p, GroupBasedParams):
            return p
        return GroupBasedParams(normalize_by_std=getattr(p, "normalize_by_std", True))

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

    def _ledger_path(self) -> str:
        return os.path.join(self.config.output_dir, "rollout_ledger.jsonl")

    def _trim_ledger(self) -> None:
        """On resume at step s: the ledger keeps the lines of steps < s (later ones were not
        saved and are trained again)."""
        path = self._ledger_path()
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] < self.step]
        if len(keep) != len(lines):
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)

    def _ledger(self, step: int, roll: StepRollout) -> None:
        """One line per consumed step in ``rollout_ledger.jsonl``: which episodes (task sample
        ids) training used, from which worker attempt and policy versions."""
        info = roll.info
        rec = {"step": step, "worker": info.get("worker"), "attempt": info.get("attempt"),
               "start_version": info.get("start_version"),
               "episodes": [t.episode_id for t in roll.trajectories]}
        with open(self._ledger_path(), "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ evaluation

    def _runner_weights_current(self) -> None:
        """The trainer's sampler holds the current version (the rollout source may be
        elsewhere: worker processes)."""
        if self.runner.policy_version != self.step:
            self.runner.load_weights(self.lora, self.step)

    def evaluate(self, split: str = "val", *, tasks: Sequence[Task] | None = None,
                 step: int | None = None, log_metrics: bool = True,
                 log_traces: bool = True) -> dict[str, float]:
        """Play a fixed split (:func:`~mtrl_jax.evaluation.metrics.play_task_set`: greedy and
        ``val_sampling_params.num_samples`` sampled episodes per task) with the current weights
        and return ``{split}/<metric>`` (:func:`~mtrl_jax.evaluation.metrics.play_metrics`).

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
        self._runner_weights_current()
        play = play_task_set(self.runner, tasks, seed=c.seed, num_samples=v.num_samples,
                             temperature=v.temperature, max_tokens=v.sampling_max_tokens,
                             tag=split, progress=self._say if self.verbose else None)
        m = {f"{split}/{k}": x for k, x in play_metrics(play, v.success_threshold).items()}
        self.last_eval = play
        with self._signals.held():  # all of the evaluation's records, or none
            if log_traces:
                bad = [t for t in play.episodes if disagrees(t, v.success_threshold)]
                for t in bad[:v.max_disagreement_traces]:
                    self.tracker.log_trajectory(t, step=step, kind=f"{split}_disagreement")
            if log_metrics:
                self.tracker.log_metrics(m, step)
        return m

    # ------------------------------------------------------------------ the run

    def train(self) -> list[dict[str, float]]:
        """Run to ``config.steps`` (from the restored step when resuming); returns the metric
        history of the steps run here."""
        c = self.config
        status = "FINISHED"
        self._signals.install()
        try:
            # validation due at the current step and not yet logged (step 0, or a resume after
            # an interruption during validation)
            if (c.eval_interval and self.step % c.eval_interval == 0
                    and not self._has_val(self.step)):
                self._log_eval(self.evaluate("val", step=self.step))
            if self.step < c.steps:
                self._start_source()
            while self.step < c.steps:
                metrics = self.train_step()  # logged and in self.history when it returns
                step = self.step  # steps done
                if c.eval_interval and step % c.eval_interval == 0:
                    metrics.update(self.evaluate("val", step=step))
                self._progress(metrics)
                if c.checkpoint_interval and step % c.checkpoint_interval == 0:
                    self.save_checkpoint()
            if c.steps and self.checkpoints.latest_step() != self.step:
                self.save_checkpoint()
            self.export()
        except KeyboardInterrupt as e:
            status = "KILLED"
            what = e.args[0] if isinstance(e, TrainingInterrupted) else "interrupt"
            if self.step > 0 and self.checkpoints.latest_step() != self.step:
                print(f"\n[mtrl] {what} at step {self.step}: saving a checkpoint",
                      file=sys.stderr, flush=True)
                self.save_checkpoint()
            else:
                print(f"\n[mtrl] {what} at step {self.step} (its checkpoint is saved)",
                      file=sys.stderr, flush=True)
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            try:
                self.source.close()
                self.tracker.end(status)
            finally:
                self._signals.restore()
        return self.history

    def _has_val(self, step: int) -> bool:
        return any(s == step for s, _ in self.tracker.metric_history("val/greedy/reward/mean"))

    def _log_eval(self, m: dict[str, float]) -> None:
        self._say(f"step {self.step:>4} | val success "
                  f"{m.get('val/greedy/strict_success', float('nan')):.3f} | val reward "
                  f"{m.get('val/greedy/reward/mean', float('nan')):.3f}")

    def _progress(self, m: dict[str, float]) -> None:
        val = m.get("val/greedy/strict_success")
        val_s = f" | val success {val:.3f}" if val is not None else ""
        wait = (f"rollout wait {m['async/wait_s']:.1f}s (staleness "
                f"{m.get('async/staleness/mean', 0.0):.1f})" if "async/wait_s" in m
                else f"rollout {m['time/rollout_s']:.1f}s")
        self._say(f"step {self.step:>4}/{self.config.steps} | reward "
                  f"{m['rollout/reward/mean']:.3f} | success "
                  f"{m.get('rollout/strict_success', float('nan')):.3f}{val_s} | "
                  f"{m['throughput/sampled_tokens_per_s']:.0f} sampled tok/s, "
                  f"{m['throughput/train_tokens_per_s']:.0f} train tok/s | {wait} "
                  f"train {m['time/train_s']:.1f}s")

    def get_mlflow_url(self) -> str:
        return self.tracker.url()

    # ------------------------------------------------------------------ checkpoints, export

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"model": dataclasses.asdict(c.model), "lora": dataclasses.asdict(c.lora),
                "optimizer": dataclasses.asdict(c.optimizer)}

    def save_checkpoint(self) -> str:
        """Save the committed state (a signal meanwhile waits until the write is done)."""
        with self._signals.held():
            meta = {"step": self.step, "data_pos": self.data_pos, "seed": self.config.seed,
                    "run_id": getattr(getattr(self, "tracker", None), "run_id", None),
                    "fingerprint": json.loads(json.dumps(self._fingerprint()))}
            if isinstance(self.updater, distributed.ShardedUpdater) \
                    and distributed.multi_process():  # each process writes its own shards
                return self.updater.save_checkpoint(self.checkpoints, self.step,
                                                    (self.lora, self.opt_state), meta)
            return self.checkpoints.save(self.step, (self.lora, self.opt_state), meta)

    def _check_fingerprint(self, meta: dict[str, Any]) -> None:
        fp = json.loads(json.dumps(self._fingerprint()))
        old = meta.get("fingerprint", {})
        diffs = [f"{sec}.{k}: checkpoint {old.get(sec, {}).get(k)!r} vs config {v!r}"
                 for sec in ("model", "lora") for k, v in fp[sec].items()
                 if old.get(sec, {}).get(k) != v]
        if diffs:
            raise IncompatibleCheckpoint(
                f"checkpoint step {meta['step']} in {self.checkpoints.directory} is "
                "incompatible with this config: " + "; ".join(diffs))

    def export(self) -> dict[str, str]:
        """Write the PEFT adapter (and the merged checkpoint when ``export_merged``)."""
        out = {}
        model = self.model
        adapter = os.path.join(self.config.output_dir, "adapter")
        export_peft_adapter(model, adapter, base_model_name_or_path=self.config.model.path)
        out["adapter"] = adapter
        if self.config.export_merged:
            merged_dir = os.path.join(self.config.output_dir, "merged")
            save_model(merge_lora(model), merged_dir)
            self.tokenizer.save_pretrained(merged_dir)
            out["merged"] = merged_dir
        return out

    def close(self) -> None:
        """Stop the rollout source and the sampler, and release the output folder's lock."""
        try:
            self.source.close()
            self.runner.close()
            close = getattr(getattr(self, "updater", None), "close", None)
            if close is not None:
                close()  # (other processes of a multi-process job return)
        finally:
            run_lock.release(self.config.output_dir)
