"""Multi-seed sweeps: a grid of recipe overrides x seeds, each child a normal training run.

    mtrl sweep --recipe configs/demo_cpu.yaml --grid algorithm.loss.name=ppo,cispo \\
        --grid async_config.max_steps_off_policy=0,2 --seeds 0-4 --name loss_x_async \\
        [--parallel 2] [KEY=VALUE ...]
    mtrl sweep-report loss_x_async [--baseline LABEL] [--metric M ...]

or from Python: ``Sweep(SweepSpec(...)).run()`` and :func:`sweep_report`.

Layout: ``<root>/<name>/`` (``root`` default ``sweeps``) holds ``sweep.json`` (the spec),
``mlflow.db`` (unless ``MLFLOW_TRACKING_URI`` points elsewhere) and one folder per cell and
seed, ``c<k>-<values>/seed<s>/``: a normal run folder (checkpoints, ledger, adapter) plus
``result.json`` once the child finished (its final held-out evaluation, per-task scores and
curves) and ``child.log`` (its output).

- **MLflow**: one parent run named after the sweep (params: the grid, seeds, recipe), each
  child a run nested under it (tag ``mlflow.parentRunId``) with the cell's values as params
  and tags ``sweep``, ``cell``, ``seed``.
- **Resumable**: the same command again skips the children that have a ``result.json`` and
  resumes interrupted ones from their checkpoints (the trainer's own resume). The grid, recipe
  and overrides must equal the stored spec (another ``--name`` otherwise); seeds may be added.
- **Failures stay local**: each child is its own process; a failed child is reported (its exit
  code and the tail of ``child.log``) and the others go on. ``run`` returns the status of each.
- **Seeds**: a child's ``seed`` sets everything random in a training run: rollout sampling, the
  LoRA initialisation and the order of the training tasks. What stays fixed across seeds: the
  base model (``model.path``, e.g. the demo's cached warm-up, trained once with its own seed)
  and the data splits (``data.data_seed``), so seeds measure the spread of RL itself.
- The children share XLA's persistent compilation cache (``<sweep>/.jax_cache``; your own
  ``JAX_COMPILATION_CACHE_DIR`` wins): a program compiles once per sweep, not once per run.
- After training, each child evaluates the held-out test split (``data.n_test`` tasks, greedy
  plus the recipe's sampled episodes) once: the figure the report compares.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

#: metrics whose per-step history each child keeps in its result (learning curves)
CURVES = ("rollout/reward/mean", "rollout/strict_success", "val/greedy/strict_success",
          "val/greedy/reward/mean")
#: per-step metrics summed over a run (compute-matched columns)
TOTALS = {"wall_s": "time/step_s", "sampled_tokens": "rollout/sampled_tokens",
          "trained_tokens": "train/tokens"}


class SweepError(ValueError):
    pass


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; ``"0,2,7"`` and ``"0-2,5"`` as expected."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise SweepError(f"seed range {part!r} runs backwards")
            out.extend(range(lo, hi + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise SweepError(f"seeds are integers or ranges like 0-4, got {part!r}")
    if not out or len(set(out)) != len(out):
        raise SweepError(f"seeds must be distinct and at least one, got {text!r}")
    return out


def _split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside brackets or braces stay (``[384,512]``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x,y"]`` -> ``{"a.b": ["1", "2"], "c": ["x", "y"]}`` (order kept)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(f"--grid takes KEY=V1,V2,..., got {item!r}")
        vals = _split_values(values)
        if any(not v for v in vals) or len(set(vals)) != len(vals):
            raise SweepError(f"--grid {key}: values must be distinct and not empty, got {vals}")
        if key in grid:
            raise SweepError(f"--grid {key} given twice")
        grid[key] = vals
    return grid


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid: ``values`` in grid order."""

    index: int
    values: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values) or "recipe"

    @property
    def folder(self) -> str:
        short = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.values) or "recipe"
        return f"c{self.index}-" + re.sub(r"[^A-Za-z0-9_.=+-]+", "-", short)[:80]

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values]


@dataclasses.dataclass
class SweepSpec:
    """``recipe``: a YAML recipe path (None: the defaults); ``grid``: key -> values (strings
    as on the command line); ``overrides``: applied to every child before the cell's values."""

    name: str
    recipe: str | None
    grid: dict[str, list[str]]
    seeds: list[int]
    overrides: list[str] = dataclasses.field(default_factory=list)
    evaluate: bool = True  # the held-out test split after training

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise SweepError(f"a sweep name is letters, digits, '_', '.', '-', got "
                             f"{self.name!r}")
        self.seeds = parse_seeds(self.seeds)
        for k in ("seed", "output_dir", "run_name", "run_tags", "experiment_name"):
            if k in self.grid or any(o.split("=", 1)[0].strip() == k for o in self.overrides):
                raise SweepError(f"{k} is set by the sweep for each child; remove it from the "
                                 "grid and overrides (seeds: --seeds)")

    def cells(self) -> list[Cell]:
        keys = list(self.grid)
        return [Cell(i, tuple(zip(keys, combo, strict=True)))
                for i, combo in enumerate(itertools.product(*(self.grid[k] for k in keys)))]

    def same_design(self, other: SweepSpec) -> list[str]:
        """What differs between two specs apart from seeds (which may grow)."""
        return [f for f in ("recipe", "grid", "overrides", "evaluate")
                if getattr(self, f) != getattr(other, f)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Sweep:
    """A sweep's folder and its children. ``tracking_uri``: the MLflow store of the parent and
    child runs (default ``$MLFLOW_TRACKING_URI`` or ``<root>/<name>/mlflow.db``)."""

    def __init__(self, spec: SweepSpec, *, root: str = "sweeps", tracking_uri: str | None = None,
                 say: Callable[[str], None] | None = print):
        self.spec = spec
        self.folder = os.path.abspath(os.path.join(root, spec.name))
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            "sqlite:///" + os.path.join(self.folder, "mlflow.db")
        self.say = say or (lambda _: None)

    @classmethod
    def open(cls, name_or_folder: str, *, root: str = "sweeps", **kw) -> Sweep:
        folder = name_or_folder if os.path.isdir(name_or_folder) else \
            os.path.join(root, name_or_folder)
        path = os.path.join(folder, "sweep.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no sweep at {folder} (no sweep.json)")
        with open(path) as f:
            d = json.load(f)
        spec = SweepSpec(**d["spec"])
        return cls(spec, root=os.path.dirname(os.path.abspath(folder)), **kw)

    # ------------------------------------------------------------------ layout

    def child_dir(self, cell: Cell, seed: int) -> str:
        return os.path.join(self.folder, cell.folder, f"seed{seed}")

    def result_path(self, cell: Cell, seed: int) -> str:
        return os.path.join(self.child_dir(cell, seed), "result.json")

    def children(self) -> list[tuple[Cell, int]]:
        return [(c, s) for c in self.spec.cells() for s in self.spec.seeds]

    def _state(self) -> dict[str, Any]:
        path = os.path.join(self.folder, "sweep.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def _write_state(self, state: dict[str, Any]) -> None:
        path = os.path.join(self.folder, "sweep.json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=2)
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------------ running

    def _prepare(self) -> dict[str, Any]:
        """Write or check ``sweep.json``; create the MLflow parent run once."""
        os.makedirs(self.folder, exist_ok=True)
        state = self._state()
        if state:
            old = SweepSpec(**state["spec"])
            diff = self.spec.same_design(old)
            if diff:
                raise SweepError(
                    f"sweep {self.spec.name!r} at {self.folder} was started with another "
                    f"{', '.join(diff)}: {[getattr(old, f) for f in diff]}; rerun it with the "
                    "same design (seeds may be added) or pick another --name")
            seeds = old.seeds + [s for s in self.spec.seeds if s not in old.seeds]
            state["spec"]["seeds"] = seeds
        else:
            state = {"spec": self.spec.to_dict(), "created": time.time()}
        if not state.get("parent_run_id"):
            state["parent_run_id"], state["experiment_name"] = self._parent_run()
        self._write_state(state)
        return state

    def _parent_run(self) -> tuple[str, str]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp_name = f"sweep/{self.spec.name}"
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
        run = client.create_run(exp_id, run_name=self.spec.name,
                                tags={"mtrl.sweep": self.spec.name, "mtrl.role": "parent"})
        params = {f"grid.{k}": ",".join(v) for k, v in self.spec.grid.items()}
        params.update(recipe=str(self.spec.recipe), seeds=",".join(map(str, self.spec.seeds)),
                      overrides=" ".join(self.spec.overrides)[:500] or "-",
                      cells=str(len(self.spec.cells())))
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id, exp_name

    def status(self) -> dict[str, str]:
        """``label/seed`` -> ``done``, ``partial`` (checkpoints, no result) or ``pending``."""
        out = {}
        for cell, seed in self.children():
            d = self.child_dir(cell, seed)
            if os.path.exists(self.result_path(cell, seed)):
                out[f"{cell.label} / seed {seed}"] = "done"
            elif os.path.isdir(os.path.join(d, "checkpoints")) and \
                    os.listdir(os.path.join(d, "checkpoints")):
                out[f"{cell.label} / seed {seed}"] = "partial"
            else:
                out[f"{cell.label} / seed {seed}"] = "pending"
        return out

    def run(self, *, parallel: int = 1, poll_s: float = 0.5) -> dict[str, Any]:
        """Run every child that has no result yet, ``parallel`` at a time. Returns
        ``{"done": [...], "failed": {child: message}, "skipped": [...]}``."""
        if parallel < 1:
            raise SweepError(f"--parallel must be at least 1, got {parallel}")
        state = self._prepare()
        todo, skipped = [], []
        for cell, seed in self.children():
            (skipped if os.path.exists(self.result_path(cell, seed)) else todo).append(
                (cell, seed))
        n = len(self.children())
        self.say(f"[sweep] {self.spec.name}: {len(self.spec.cells())} cells x "
                 f"{len(self.spec.seeds)} seeds = {n} runs; {len(skipped)} done already, "
                 f"{len(todo)} to run ({parallel} at a time); {self.folder}")
        running: list[tuple[Cell, int, subprocess.Popen, float, Any]] = []
        done, failed = [], {}
        queue = list(todo)
        t_start = time.perf_counter()
        try:
            while queue or running:
                while queue and len(running) < parallel:
                    cell, seed = queue.pop(0)
                    d = self.child_dir(cell, seed)
                    os.makedirs(d, exist_ok=True)
                    log = open(os.path.join(d, "child.log"), "a")
                    cmd = [sys.executable, "-m", "mtrl_jax.sweep", "child", self.folder,
                           str(cell.index), str(seed), self.tracking_uri]
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self._child_env())
                    running.append((cell, seed, proc, time.perf_counter(), log))
                    self.say(f"[sweep] start {cell.label} / seed {seed}")
                time.sleep(poll_s)
                for item in list(running):
                    cell, seed, proc, t0, log = item
                    rc = proc.poll()
                    if rc is None:
                        continue
                    running.remove(item)
                    log.close()
                    key = f"{cell.label} / seed {seed}"
                    if rc == 0 and os.path.exists(self.result_path(cell, seed)):
                        done.append(key)
                        with open(self.result_path(cell, seed)) as f:
                            r = json.load(f)
                        score = r.get("test", {}).get("test/greedy/strict_success")
                        self.say(f"[sweep] done  {key} in {time.perf_counter() - t0:.0f} s"
                                 + (f" | test strict success {score:.3f}"
                                    if score is not None else "")
                                 + f" | {len(done) + len(skipped) + len(failed)}/{n}")
                    else:
                        tail = _tail(os.path.join(self.child_dir(cell, seed), "child.log"))
                        failed[key] = f"exit code {rc}: {tail}"
                        self.say(f"[sweep] FAILED {key} (exit code {rc}); the others go on. "
                                 f"Last lines of {self.child_dir(cell, seed)}/child.log:\n"
                                 f"{tail}")
        except BaseException:
            for _, _, proc, _, log in running:  # no child outlives an interrupted sweep
                _stop(proc)
                log.close()
            raise
        self._finish_parent(state, failed)
        self.say(f"[sweep] {self.spec.name}: {len(done)} run now, {len(skipped)} skipped, "
                 f"{len(failed)} failed, {time.perf_counter() - t_start:.0f} s"
                 + ("" if not failed else "; rerun the same command to retry the failed ones"))
        return {"done": done, "failed": failed, "skipped": [f"{c.label} / seed {s}"
                                                            for c, s in skipped]}

    def _child_env(self) -> dict[str, str]:
        """The children share XLA's persistent compilation cache (the same programs compile
        once per sweep, not once per run), unless the user set their own; and they start with
        the fast ``malloc`` that ``mtrl train`` re-executes itself for (:mod:`mtrl_jax.runtime`)."""
        from mtrl_jax.runtime import fast_malloc_env

        env = fast_malloc_env(os.environ)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(self.folder, ".jax_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
        return env

    def _finish_parent(self, state: dict[str, Any], failed: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        client.set_tag(state["parent_run_id"], "mtrl.failed_children", str(len(failed)))
        client.set_terminated(state["parent_run_id"], status="FAILED" if failed else "FINISHED")


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)  # the trainer saves a checkpoint on SIGINT
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ---------------------------------------------------------------------------- one child


def run_child(folder: str, cell_index: int, seed: int, tracking_uri: str) -> dict[str, Any]:
    """Train (or resume) one child and write its ``result.json``."""
    from mtrl_jax.evaluation.metrics import per_task_scores
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    with open(os.path.join(folder, "sweep.json")) as f:
        state = json.load(f)
    spec = SweepSpec(**state["spec"])
    cell = spec.cells()[cell_index]
    sweep = Sweep(spec, root=os.path.dirname(folder), tracking_uri=tracking_uri, say=None)
    out = sweep.child_dir(cell, seed)
    tags = {"mlflow.parentRunId": state["parent_run_id"], "mtrl.sweep": spec.name,
            "mtrl.cell": cell.label, "mtrl.seed": str(seed)}
    overrides = list(spec.overrides) + cell.overrides + [
        f"seed={seed}", f"output_dir={out}", f"run_name={cell.folder}/seed{seed}",
        f"experiment_name={state['experiment_name']}", "tracker=mlflow"]
    t0 = time.perf_counter()
    trainer = MultiTurnRLTrainer(spec.recipe, overrides=overrides + [
        "run_tags=" + json.dumps(tags)], tracking_uri=tracking_uri, resume="auto",
        on_existing="overwrite")
    try:
        trainer.tracker.set_tags({f"grid.{k}": v for k, v in cell.values})
        trainer.train()
        result: dict[str, Any] = {"cell": cell.label, "cell_values": dict(cell.values),
                                  "seed": seed, "run_id": getattr(trainer.tracker, "run_id", None),
                                  "steps": trainer.step}
        if spec.evaluate:
            result["test"] = trainer.evaluate("test", step=trainer.step)
            result["per_task"] = per_task_scores(trainer.last_eval)
        hist = {k: trainer.tracker.metric_history(k) for k in
                set(CURVES) | set(TOTALS.values())}
        result["curves"] = {k: sorted(v) for k, v in hist.items() if v and k in CURVES}
        epochs = trainer.config.optimizer.epochs
        result["totals"] = {name: sum(v for _, v in hist.get(metric, []))
                            * (epochs if name == "trained_tokens" else 1)
                            for name, metric in TOTALS.items()}
        result["child_wall_s"] = time.perf_counter() - t0  # this invocation (resumes add up)
    finally:
        trainer.close()
    path = os.path.join(out, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 5 and argv[0] == "child":
        run_child(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    print("usage: python -m mtrl_jax.sweep child FOLDER CELL SEED TRACKING_URI "
          "(started by mtrl sweep)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
