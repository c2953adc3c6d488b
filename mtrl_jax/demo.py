"""The CPU demo: a tiny model gets a foothold by supervised warm-up, then RL raises its held-out
strict task success.

1. Task: ``sop_synth:preflight`` (three tools, four output fields; the answer depends on what
   the tools return: a weight deviation, a battery status, a serial's registry status).
2. Tokenizer: word-level, its vocabulary read off oracle episodes of every split (ids, numbers
   and codes are single tokens), with a compact ChatML template.
3. Warm-up (cached under ``$MTRL_DATA_DIR/demo/<hash>``, an HF checkpoint folder): supervised
   training of a random 2-layer model on trajectories of a *noisy teacher* run through the real
   agent loop: it calls the tools in random order, one per turn or all at once, sometimes skips
   one (and then guesses), and in borderline cases (a deviation of 1 or 2 kg, a ``nominal``
   or ``degraded`` battery, a ``pending`` serial) gives the wrong answer with
   probability ``teacher_bias``. The base therefore fails in several ways but has a foothold on
   every skill: it samples the right answer in borderline cases some of the time.
4. RL: :class:`~mtrl_jax.training.trainer.MultiTurnRLTrainer` with ``configs/demo_cpu.yaml``
   (LoRA on the warm base, GRPO, strict-aligned dense reward).
5. The held-out test split (never trained on) is scored with the strict external evaluation
   before and after RL, greedy and sampled; a table is printed.
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
    synth_domain,
    tool_call_text,
)
from mtrl_jax.envs.sop import run_mapping

DEMO_TASK = "sop_synth:preflight"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_RECIPE = os.path.join(REPO, "configs", "demo_cpu.yaml")


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    teacher_bias: float = 0.7
    skip_prob: float = 0.15
    one_call_per_turn_prob: float = 0.5
    episodes: int = 4000
    steps: int = 400
    batch_episodes: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    data_seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + _code_version()
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _code_version() -> str:
    """Bump when the warm-up's data or format changes (invalidates cached bases)."""
    # v4: teacher prompts without the tool-spec fallback (as RL's); v5: the teacher errs on
    # `pending` serials only, no longer on `recalled` ones (BORDERLINE_REGISTRY)
    return "preflight-v5"


# ----------------------------------------------------------------------------- the teacher

BORDERLINE_BATTERY = ("nominal", "degraded")
#: v4's teacher also erred on `recalled` (answering `match`): swapped with `pending`, the two
#: values stayed so close in the base that RL's push of `recalled` towards `mismatch` dragged
#: `pending` along in 2 of 5 seeds, which never learned it (issue 20; LOG 2026-12-04, thirteenth
#: session). Erring on one side of the serial rule keeps a borderline case to fix without that
#: tug of war.
BORDERLINE_REGISTRY = ("pending",)

#: (field, tool, borderline test on the task's row, (positive, negative) answer)
TEACHER_CHECKS = (
    ("mechanical", "inspect_mechanical", lambda r: int(r["deviation_kg"]) in (1, 2),
     ("pass", "fail")),
    ("electrical", "inspect_electrical", lambda r: r["battery"] in BORDERLINE_BATTERY,
     ("pass", "fail")),
    ("serial", "verify_serial", lambda r: r["registry"] in BORDERLINE_REGISTRY,
     ("match", "mismatch")),
)


def teacher_turns(task, rng: random.Random, cfg: WarmupConfig) -> list[str]:
    """The noisy teacher's assistant turns for one preflight task (see the module doc)."""
    row = task.data["row"]
    aid = row["aircraft_id"]
    tools = ["inspect_mechanical", "inspect_electrical", "verify_serial"]
    rng.shuffle(tools)
    called = [t for t in tools if rng.random() >= cfg.skip_prob]
    calls = [tool_call_text(t, {"aircraft_id": aid}) for t in called]
    if not calls:
        turns = []
    elif rng.random() < cfg.one_call_per_turn_prob:
        turns = calls
    else:
        turns = ["".join(calls)]
    fields = {}
    for field, tool, borderline, pair in TEACHER_CHECKS:
        if tool not in called:
            fields[field] = pair[0]  # a skipped tool: guess the common answer
        elif borderline(row) and rng.random() < cfg.teacher_bias:
            fields[field] = _flip(task.expected[field], pair)
        else:
            fields[field] = task.expected[field]
    ok = all(fields[f] == pair[0] for f, _, _, pair in TEACHER_CHECKS)
    fields["ready"] = "yes" if ok else "no"
    return turns + [final_output_text(fields)]


def _flip(value: str, pair: tuple[str, str]) -> str:
    return pair[1] if value == pair[0] else pair[0]


# ----------------------------------------------------------------------------- tokenizer


def demo_corpus(seed: int = 0) -> list[str]:
    """Texts holding every piece the demo's episodes can contain (prompts, calls, results,
    answers, template glue), rendered from the rows of every split."""
    domain = synth_domain("preflight", seed)
    texts = ["<|im_start|>user\n<|im_start|>assistant\n<|im_start|>system\n<tool_response>"
             "\n</tool_response><|im_end|>Error: error"]
    # the tools' error messages (unknown aircraft, missing argument, unknown tool)
    for m in domain.mappings.values():
        texts += [str(m.spec.get("not_found", "")), str(m.spec.get("missing", ""))]
    texts.append("Error: Tool 'x' not found. Available tools: " + ", ".join(domain.mappings))
    texts.append(final_output_text({"mechanical": "pass", "electrical": "fail",
                                    "serial": "mismatch", "ready": "yes"}))
    texts.append(final_output_text({"serial": "match", "ready": "no"}))
    for split in domain.rows:
        for task in domain.tasks(split):
            texts.append(task.prompt)
            for name, m in domain.mappings.items():
                args = {"aircraft_id": task.data["row"]["aircraft_id"]}
                texts.append(tool_call_text(name, args))
                texts.append(json.dumps(run_mapping(m, [task.data["row"]], args)))
    return texts


# ----------------------------------------------------------------------------- warm-up


def warmup(cfg: WarmupConfig = WarmupConfig(), *, out_dir: str | None = None,
           verbose: bool = True, force: bool = False) -> str:
    """Train (or reuse) the warm-started base; returns its checkpoint folder."""
    from mtrl_jax.models.checkpoint import save_model
    from mtrl_jax.models.config import ModelConfig
    from mtrl_jax.models.tokenizer import build_word_tokenizer
    from mtrl_jax.models.transformer import CausalLM

    out_dir = out_dir or os.path.join(data_dir(), "demo", f"warmup-{cfg.key()}")
    done = os.path.join(out_dir, "warmup.json")
    if os.path.exists(done) and not force:
        if verbose:
            with open(done) as f:
                info = json.load(f)
            print(f"[demo] warm-up: cached base {out_dir} (trained in "
                  f"{info['seconds']:.0f} s)", flush=True)
        return out_dir
    t0 = time.perf_counter()
    tok = build_word_tokenizer(demo_corpus(cfg.data_seed))
    trajs = teacher_trajectories(tok, cfg)
    if verbose:
        print(f"[demo] warm-up: {len(trajs)} teacher episodes through the agent loop "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    mcfg = ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size,
                       num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       max_position_embeddings=1024, tie_word_embeddings=True)
    model = CausalLM(mcfg, None, rngs=nnx.Rngs(cfg.seed))
    losses = sft(model, trajs, cfg, verbose=verbose)
    tmp = out_dir + ".tmp"
    save_model(model, tmp)
    tok.save_pretrained(tmp)
    info = {"config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - t0,
            "final_loss": losses[-1], "episodes": len(trajs), "vocab": len(tok),
            "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}
    with open(os.path.join(tmp, "warmup.json"), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    if verbose:
        print(f"[demo] warm-up done in {info['seconds']:.0f} s: {info['params']} parameters, "
              f"vocab {info['vocab']}, final loss {info['final_loss']:.3f}", flush=True)
    return out_dir


def teacher_trajectories(tok, cfg: WarmupConfig):
    """Noisy-teacher episodes through the real agent loop (token-in/token-out, loss masks)."""
    import asyncio

    from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
    from mtrl_jax.rollout.sampler import ScriptedSampler

    tasks = [dataclasses.replace(t, system=None)
             for t in load_tasks(DEMO_TASK, "train", None, cfg.data_seed)]
    rng = random.Random(cfg.seed)
    plans: dict[str, list[str]] = {}
    jobs = []
    for i in range(cfg.episodes):
        task = tasks[rng.randrange(len(tasks))]
        eid = f"w{i}"
        plans[eid] = teacher_turns(task, rng, cfg)
        jobs.append((task, eid))
    sampler = ScriptedSampler(tok, lambda eid, turn, _: plans[eid][min(turn,
                                                                         len(plans[eid]) - 1)],
                              stop_token_id=tok.eos_token_id)
    # the prompts the RL recipe renders (rollout.tool_specs: template): the tiny template shows
    # no tool specs, and RL must see what the warm-up trained on
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=6, sampling_max_tokens=128,
                                                   max_context_tokens=512,
                                                   tool_specs="template"))

    async def go():
        sem = asyncio.Semaphore(256)

        async def one(task, eid):
            async with sem:
                return await loop.run(make_env(task), task, episode_id=eid)

        return await asyncio.gather(*(one(t, e) for t, e in jobs))

    return asyncio.run(go())


def sft(model, trajs, cfg: WarmupConfig, *, verbose: bool = True) -> list[float]:
    """Full-parameter supervised training on the sampled tokens of ``trajs``."""
    from mtrl_jax.models.logprobs import token_logprobs
    from mtrl_jax.training.packing import Segment, pack

    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps, alpha=0.1),
        weight_decay=0.0))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            lp = token_logprobs(m, batch["tokens"], batch["positions"], batch["segment_ids"],
                                use_lora=False).logprobs
            mask = batch["loss_mask"]
            return -(lp * mask).sum() / mask.sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    segs = [Segment(*(s.arrays()[k] for k in ("tokens", "loss_mask", "logprobs")), 1.0)
            for t in trajs for s in t.samples]
    rng = np.random.default_rng(cfg.seed)
    losses = []
    t0 = last = time.perf_counter()
    for i in range(cfg.steps):
        idx = rng.choice(len(segs), cfg.batch_episodes, replace=False)
        b = pack([segs[j] for j in idx], (512, 1024), multiple=8)
        batch = {k: jax.numpy.asarray(getattr(b, k)) for k in
                 ("tokens", "positions", "segment_ids", "loss_mask")}
        params, opt, loss = step(params, opt, batch)
        if i % 50 == 0 or i == cfg.steps - 1:
            losses.append(float(loss))
        if verbose and (time.perf_counter() - last >= 10 or i == cfg.steps - 1):
            last = time.perf_counter()
            print(f"[demo] warm-up step {i + 1:>4}/{cfg.steps} loss {float(loss):.4f} "
                  f"({last - t0:.0f} s)", flush=True)
    nnx.update(model, params)
    return losses


# ----------------------------------------------------------------------------- the demo


def run_demo(*, seeds: list[int] | tuple[int, ...] = (0,), output_dir: str = "runs/demo",
             overrides: list[str] | None = None, warmup_cfg: WarmupConfig = WarmupConfig(),
             verbose: bool = True, base: str | None = None,
             recipe: str = DEMO_RECIPE) -> dict[str, Any]:
    """Warm-up (cached; or ``base``, a warm checkpoint folder), then per seed: test-split
    evaluation of the base, RL with ``recipe``, evaluation of the trained policy. Returns and
    writes ``<output_dir>/demo_results.json``."""
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    base = base or warmup(warmup_cfg, verbose=verbose)
    results: dict[str, Any] = {"base_checkpoint": base, "seeds": {}}
    for seed in seeds:
        run_dir = os.path.join(output_dir, f"seed{seed}")
        trainer = MultiTurnRLTrainer(recipe, overrides=[
            f"model.path={base}", f"seed={seed}", f"output_dir={run_dir}",
            f"run_name=demo-seed{seed}", *(overrides or [])], resume=False,
            on_existing="overwrite", verbose=verbose)
        before = trainer.evaluate("test", step=0)
        t0 = time.perf_counter()
        trainer.train()
        rl_seconds = time.perf_counter() - t0
        after = trainer.evaluate("test", step=trainer.step)
        trainer.tracker.log_metrics({f"demo/base_{k.split('/', 1)[1]}": v
                                     for k, v in before.items()}, trainer.step)
        results["seeds"][seed] = {"before": before, "after": after, "rl_seconds": rl_seconds,
                                  "mlflow": trainer.get_mlflow_url()}
        trainer.close()
        if verbose:
            print_table(seed, before, after, rl_seconds, trainer.get_mlflow_url())
    if len(seeds) > 1 and verbose:
        b = np.mean([r["before"]["test/greedy/strict_success"] for r in results["seeds"].values()])
        a = np.mean([r["after"]["test/greedy/strict_success"] for r in results["seeds"].values()])
        print(f"[demo] mean over {len(seeds)} seeds: held-out strict success {b:.3f} -> "
              f"{a:.3f} ({100 * (a - b):+.1f} points)")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


def print_table(seed: int, before: dict, after: dict, rl_seconds: float, url: str) -> None:
    rows = [("strict task success (greedy)", "test/greedy/strict_success"),
            ("strict task success (sampled)", "test/sampled/strict_success"),
            ("strict pass@8 (sampled)", "test/strict_pass_k_8"),
            ("field accuracy", "test/greedy/field_acc"),
            ("completion rate", "test/greedy/completion_rate"),
            ("mean turns", "test/greedy/turns/mean")]
    print(f"\n[demo] seed {seed}: held-out test split, RL phase {rl_seconds:.0f} s")
    print(f"  {'metric':<32}{'base':>8}{'trained':>10}{'diff':>9}")
    for label, k in rows:
        b, a = before.get(k, float("nan")), after.get(k, float("nan"))
        print(f"  {label:<32}{b:>8.3f}{a:>10.3f}{a - b:>+9.3f}")
    print(f"  MLflow: {url}\n", flush=True)
