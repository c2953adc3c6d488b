"""The external evaluation: a fixed held-out split, the strict scorer, pass@k, base vs fine-tuned.

RL optimises the reward literally; this is the measure to believe. For each model it plays the
split with :func:`~mtrl_jax.evaluation.metrics.play_task_set` (one greedy episode per task,
``samples_per_task`` sampled ones, keys from the seed only, so base and fine-tuned see identical
tasks and seeds, and the trainer's validation of the same weights gives the same figures) and
reports :func:`~mtrl_jax.evaluation.metrics.play_metrics`: ``greedy/strict_success``,
``sampled/strict_success``, ``strict_pass_k_{k}``, ``reward_pass_k_{k}``, and per set the
reward, field accuracy, completion, turn and token budgets, tool use and format compliance (the
definitions are in :mod:`mtrl_jax.evaluation.metrics`).

With ``evaluate_base_model=True`` the base (adapters off) is scored too, and each headline
metric gets a ``diff`` with a 95% bootstrap confidence interval over tasks. Results go to
``<output_dir>/eval_results.json`` and to the tracker (metrics, and trajectories whose reward
and strict score disagree as traces).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.families import load_tasks
from mtrl_jax.evaluation.metrics import (
    Play,
    disagrees,
    per_task_scores,
    play_metrics,
    play_task_set,
)

__all__ = ["HEADLINE", "MultiTurnRLEvaluator", "bootstrap_diff"]

#: the metrics compared base vs fine-tuned, paired per task
HEADLINE = ("greedy/strict_success", "sampled/strict_success", "greedy/reward/mean")


def bootstrap_diff(a: np.ndarray, b: np.ndarray, *, n: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """``mean(b - a)`` over paired per-task scores and its bootstrap ``level`` interval
    (tasks resampled with replacement). Returns ``(diff, low, high)``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired per-task scores needed, got shapes {a.shape} and {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


class MultiTurnRLEvaluator:
    """Score a model (a local HF checkpoint, optionally with a PEFT adapter from a run) on a
    fixed split.

    Args:
      model: checkpoint folder (``model.path``); None keeps the recipe's.
      adapter: a PEFT adapter folder (a run's ``<output_dir>/adapter``): the fine-tuned model.
      dataset: a task family name (``sop_synth:preflight``); or ``tasks`` (+ ``make_env``).
      recipe, overrides: the run's recipe (rollout limits, sampling, system prompt, reward);
        ``val_sampling_params`` sets ``samples_per_task``, temperature and budgets.
      split, n_tasks: which tasks (default: the recipe's test split, ``data.n_test``).
      samples_per_task: sampled episodes per task for pass@k (default: the recipe's
        ``val_sampling_params.num_samples``).
      success_threshold: reward counted as success for ``reward_pass_k``.
      evaluate_base_model: score the base (adapters off) too, side by side, with differences.
      seed: evaluation seed (same seed, same numbers).
      reference_endpoint: an OpenAI-compatible base URL (``.../v1``): ``reference_model``
        there is played text-level through the same environments and scorer, as a
        "what good looks like" column (``reference``). Its sampling is the endpoint's: not
        seeded by ``seed``.
    """

    def __init__(self, model: str | os.PathLike | None = None, *,
                 adapter: str | os.PathLike | None = None, dataset: str | None = None,
                 recipe: str | os.PathLike | dict | None = None,
                 overrides: list[str] | dict[str, Any] | None = None,
                 split: str = "test", n_tasks: int | None = None,
                 tasks: Sequence[Task] | None = None,
                 make_env: Callable[[Task], Environment] | None = None,
                 samples_per_task: int | None = None, success_threshold: float | None = None,
                 evaluate_base_model: bool = False, seed: int = 0,
                 output_dir: str | os.PathLike = "runs/eval", tracking_uri: str | None = None,
                 experiment_name: str = "mtrl_eval", bootstrap: int = 1000,
                 reference_endpoint: str | None = None, reference_model: str = "reference",
                 reference_api_key: str | None = None, reference_concurrency: int = 8,
                 verbose: bool = True):
        from mtrl_jax.config import load_config
        from mtrl_jax.models.checkpoint import peft_lora_config

        ov: dict[str, Any] = {}
        if isinstance(overrides, dict):
            ov.update(overrides)
        if model is not None:
            ov["model.path"] = os.fspath(model)
        if dataset is not None:
            ov["data.task"] = dataset
        if samples_per_task is not None:
            ov["val_sampling_params.num_samples"] = samples_per_task
        if success_threshold is not None:
            ov["val_sampling_params.success_threshold"] = success_threshold
        if adapter is not None:
            lc = peft_lora_config(adapter)
            ov.update({"lora.lora_rank": lc.rank, "lora.lora_alpha": lc.alpha,
                       "lora.targets": list(lc.targets)})
        ov.update({"seed": seed, "output_dir": os.fspath(output_dir),
                   "experiment_name": experiment_name})
        extra = list(overrides) if isinstance(overrides, list) else []
        self.config = load_config(recipe, extra + [f"{k}={json.dumps(v)}" for k, v in ov.items()])
        self.adapter = None if adapter is None else os.fspath(adapter)
        self.evaluate_base_model = evaluate_base_model
        self.bootstrap = bootstrap
        self.verbose = verbose
        self.tracking_uri = tracking_uri
        d = self.config.data
        if tasks is None:
            split_name = getattr(d, f"{split}_split", split)
            n = n_tasks if n_tasks is not None else (d.n_test if split == "test" else d.n_val)
            tasks = load_tasks(d.task, split_name, n, d.data_seed)
        elif n_tasks is not None:
            tasks = list(tasks)[:n_tasks]
        if d.system_prompt == "none":
            tasks = [dataclasses.replace(t, system=None) for t in tasks]
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("no tasks to evaluate")
        self.split = split
        self.make_env = make_env
        self.reference = None
        if reference_endpoint is not None:
            from mtrl_jax.evaluation.openai_compat import OpenAIChatClient

            self.reference = OpenAIChatClient(reference_endpoint, reference_model,
                                              reference_api_key)
        self.reference_concurrency = reference_concurrency

    def _play(self, runner, name: str) -> Play:
        c = self.config
        v = c.val_sampling_params
        say = (lambda line: print(f"[mtrl] {line}", flush=True)) if self.verbose else None
        return play_task_set(runner, self.tasks, seed=c.seed, num_samples=v.num_samples,
                             temperature=v.temperature, max_tokens=v.sampling_max_tokens,
                             tag=f"eval {name}", progress=say)

    def _play_reference(self, runner) -> Play:
        import asyncio

        from mtrl_jax.evaluation.openai_compat import run_reference_episode

        c = self.config
        v = c.val_sampling_params
        sem = asyncio.Semaphore(self.reference_concurrency)

        async def one(task, temperature, eid):
            async with sem:
                return await run_reference_episode(
                    self.reference, runner.env(task), task, max_turns=c.rollout.max_turns,
                    temperature=temperature, max_tokens=v.sampling_max_tokens, episode_id=eid)

        async def go():
            greedy = await asyncio.gather(*(one(t, 0.0, f"refg/{t.id}") for t in self.tasks))
            sampled = await asyncio.gather(*(
                one(t, v.temperature, f"refs/{t.id}#{k}") for t in self.tasks
                for k in range(v.num_samples)))
            return list(greedy), list(sampled)

        t0 = time.perf_counter()
        greedy, sampled = asyncio.run(go())  # strict scores filled in by the episodes
        return Play(self.tasks, greedy, sampled, v.num_samples, time.perf_counter() - t0)

    def evaluate(self) -> dict[str, Any]:
        """Play and score every model; returns (and writes) the results."""
        from mtrl_jax.models.checkpoint import load_peft_adapter
        from mtrl_jax.rollout.runner import RolloutRunner, build_policy
        from mtrl_jax.tracking import make_tracker

        c = self.config
        t0 = time.perf_counter()
        tokenizer, model = build_policy(c)  # fresh adapters, B = 0: the base model
        runner = RolloutRunner(c, tokenizer, model, self.make_env)
        thr = c.val_sampling_params.success_threshold
        plays: dict[str, Play] = {}
        try:
            if self.adapter is None or self.evaluate_base_model:
                plays["base"] = self._play(runner, "base")
            if self.adapter is not None:
                load_peft_adapter(model, self.adapter)
                plays["finetuned"] = self._play(runner, "finetuned")
            if self.reference is not None:
                plays["reference"] = self._play_reference(runner)
        finally:
            runner.close()
        self.plays = plays
        results: dict[str, Any] = {
            "split": self.split, "n_tasks": len(self.tasks), "seed": c.seed,
            "model": c.model.path, "adapter": self.adapter, "task": c.data.task,
            "samples_per_task": c.val_sampling_params.num_samples, "success_threshold": thr,
            "models": {}, "per_task": {}, "episodes": {}, "disagreements": {}}
        for name, play in plays.items():
            results["models"][name] = play_metrics(play, thr)
            results["per_task"][name] = per_task_scores(play)
            eps = play.episodes
            results["episodes"][name] = {
                "turns": [t.num_turns for t in eps],
                "sampled_tokens": [t.num_sampled_tokens for t in eps],
                "finish_reason": [t.finish_reason for t in eps],
                "max_turns": c.rollout.max_turns,
                "sampling_max_tokens": c.val_sampling_params.sampling_max_tokens}
            results["disagreements"][name] = [
                {"task_id": t.task_id, "episode_id": t.episode_id, "reward": t.reward,
                 "strict": t.strict_score, "final_text": (t.final_text or "")[:400],
                 "last_messages": [{"role": m["role"], "content": str(m["content"])[:300]}
                                   for m in t.messages[-3:]]}
                for t in eps if disagrees(t, thr)
            ][:c.val_sampling_params.max_disagreement_traces]
        if "base" in plays and "finetuned" in plays:
            diffs = {}
            for metric in HEADLINE:
                a = results["per_task"]["base"].get(metric)
                b = results["per_task"]["finetuned"].get(metric)
                if not a or not b:
                    continue
                diff, lo, hi = bootstrap_diff(np.array(a), np.array(b), n=self.bootstrap,
                                              seed=c.seed)
                diffs[metric] = {"diff": diff, "ci95": [lo, hi]}
            results["diff"] = diffs
        results["seconds"] = time.perf_counter() - t0
        os.makedirs(c.output_dir, exist_ok=True)
        tracker = make_tracker(c.tracker, output_dir=c.output_dir,
                               experiment_name=c.experiment_name, run_name=f"eval-{self.split}",
                               tracking_uri=self.tracking_uri)
        try:
            tracker.log_params({"model": c.model.path, "adapter": self.adapter,
                                "task": c.data.task, "split": self.split,
                                "n_tasks": len(self.tasks), "seed": c.seed})
            flat = {f"eval/{m}/{k}": v for m, ms in results["models"].items()
                    for k, v in ms.items()}
            for metric, d in results.get("diff", {}).items():
                flat[f"eval/diff/{metric}"] = d["diff"]
                flat[f"eval/diff/{metric}_ci_low"] = d["ci95"][0]
                flat[f"eval/diff/{metric}_ci_high"] = d["ci95"][1]
            tracker.log_metrics(flat, 0)
            v = c.val_sampling_params
            for name, play in plays.items():
                bad = [t for t in play.episodes if disagrees(t, thr)]
                for t in bad[:v.max_disagreement_traces]:
                    tracker.log_trajectory(t, step=0, kind=f"eval_{name}_disagreement")
            results["mlflow"] = tracker.url()
        finally:
            tracker.end("FINISHED")
        path = os.path.join(c.output_dir, "eval_results.json")
        with open(path, "w") as f:  # after tracking: the file names the run it logged
            json.dump(results, f, indent=1)
        self.results_path = path
        if self.verbose:
            print(format_results(results), flush=True)
        return results


def format_results(results: dict[str, Any]) -> str:
    """A side-by-side text table of an evaluation's headline metrics."""
    models = list(results["models"])
    passk = sorted((k for k in results["models"][models[0]] if k.startswith("strict_pass_k_")),
                   key=lambda k: int(k.rsplit("_", 1)[1]))
    keys = ["greedy/strict_success", "sampled/strict_success", *passk]
    keys += [f"greedy/{k}" for k in ("reward/mean", "field_acc", "completion_rate",
                                     "max_turns_frac", "truncated_frac", "error_frac",
                                     "tool_error_rate", "format_compliance", "turns/mean",
                                     "tokens/response_mean")]
    lines = [f"{results['task']} ({results['split']}, {results['n_tasks']} tasks, "
             f"{results['samples_per_task']} samples each, seed {results['seed']})",
             f"{'metric':<30}" + "".join(f"{m:>12}" for m in models)]
    for k in keys:
        vals = [results["models"][m].get(k) for m in models]
        if all(v is None for v in vals):
            continue
        lines.append(f"{k:<30}" + "".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}"
                                          for v in vals))
    for metric, d in results.get("diff", {}).items():
        lines.append(f"diff {metric:<25} {d['diff']:+.3f} (95% CI {d['ci95'][0]:+.3f} .. "
                     f"{d['ci95'][1]:+.3f}, bootstrap over tasks)")
    return "\n".join(lines)
