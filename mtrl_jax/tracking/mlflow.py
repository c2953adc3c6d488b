"""The MLflow tracker: metrics, the resolved config as params, trajectories as traces.

Default store: a sqlite database in the run folder (``sqlite:///<output_dir>/mlflow.db``), so no
server is needed; ``MLFLOW_TRACKING_URI`` (or ``tracking_uri=``) points anywhere else, e.g. a
real ``mlflow server``. Open the embedded store with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db``.

A trajectory becomes one trace: a root ``AGENT`` span (task, final answer, reward, strict score,
finish reason as attributes), one ``LLM`` span per assistant turn, and a ``TOOL`` span per tool
call under the turn that made it. Span times are reconstructed from the episode's timings.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

from mtrl_jax.rollout.trajectory import Trajectory

SOURCE_RUN = "mlflow.sourceRun"


_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def safe_metric_name(name: str) -> str:
    """``name`` with the characters MLflow rejects in a metric name replaced by ``_`` (a metric
    named from model or user text must not end a run when it is logged)."""
    return _MLFLOW_UNSAFE.sub("_", name)


def default_tracking_uri(output_dir: str) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlflow.db"))


class MLflowTracker:
    """One MLflow run. ``run_id`` resumes an existing run (checkpoint resume)."""

    def __init__(self, tracking_uri: str, experiment_name: str, *, run_name: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None):
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = tracking_uri
        user_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)  # traces go through the global URI
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; keep the user's environment as it
        # was, or a second trainer in this process would log into the first one's store
        if user_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_env
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = exp.experiment_id if exp else \
            self.client.create_experiment(experiment_name)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
            self.run_id = run.info.run_id
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    # ---------------------------------------------------------------- metrics and params

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(safe_metric_name(k), float(v), now, step) for k, v in metrics.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, name)]

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def flush(self) -> None:
        try:
            self.mlflow.flush_trace_async_logging()
        except Exception:
            pass

    def url(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return (f"{self.uri} (open with: mlflow ui --backend-store-uri {self.uri}) "
                f"experiment {self.experiment_id}, run {self.run_id}")

    # ---------------------------------------------------------------- traces

    def log_trajectory(self, traj: Trajectory, *, step: int, kind: str) -> str | None:
        """Write ``traj`` as a trace; returns its trace id."""
        mlflow = self.mlflow
        t_end = time.time_ns()
        total = int(traj.timings.get("total_s", 0.0) * 1e9)
        t0 = t_end - max(total, 1000)
        attrs = {"task_id": traj.task_id, "episode_id": traj.episode_id, "step": step,
                 "kind": kind, "reward": traj.reward, "strict_score": traj.strict_score,
                 "finish_reason": traj.finish_reason, "num_turns": traj.num_turns,
                 "sampled_tokens": traj.num_sampled_tokens,
                 "tool_errors": traj.tool_error_count, "format_errors": traj.format_errors}
        user = next((m["content"] for m in traj.messages if m["role"] == "user"), "")
        root = mlflow.start_span_no_context(
            f"episode {traj.task_id}", span_type="AGENT", inputs={"task": user},
            attributes=attrs, experiment_id=self.experiment_id, start_time_ns=t0,
            tags={"kind": kind, "step": str(step)},
            metadata={SOURCE_RUN: self.run_id})
        # split the episode's span evenly over its assistant turns (per-turn times are not kept)
        turns = [i for i, m in enumerate(traj.messages) if m["role"] == "assistant"]
        width = max(1, (t_end - t0) // max(1, len(turns)))
        for n, i in enumerate(turns):
            ts = t0 + n * width
            span = mlflow.start_span_no_context(
                f"turn {n}", span_type="LLM", parent_span=root,
                inputs={"messages": len(traj.messages[:i])}, start_time_ns=ts,
                attributes={"turn": n})
            calls = [c for c in traj.tool_calls if c.turn == n]
            for c in calls:
                tool_span = mlflow.start_span_no_context(
                    f"tool {c.name}", span_type="TOOL", parent_span=span,
                    inputs={"arguments": c.arguments}, start_time_ns=ts + width // 2,
                    attributes={"error": c.error or "", "seconds": c.seconds})
                tool_span.end(outputs={"result": c.result},
                              status="ERROR" if c.error else "OK",
                              end_time_ns=ts + width // 2 + int(c.seconds * 1e9) + 1)
            span.end(outputs={"content": traj.messages[i]["content"]},
                     end_time_ns=ts + width - 1)
        root.end(outputs={"final": traj.final_text, "reward": traj.reward,
                          "strict_score": traj.strict_score}, end_time_ns=t_end)
        return root.trace_id


def _param_str(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:6000]


def read_run_history(run: str, tracking_uri: str | None = None
                     ) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """Every metric's ``(step, value)`` history of an MLflow run: ``run`` is a run folder (its
    ``mlflow.db``; the newest run in it) or a run id (``tracking_uri`` or
    ``$MLFLOW_TRACKING_URI``). Returns ``(history, run_id)``."""
    from mlflow.tracking import MlflowClient

    run_id = run
    if os.path.isdir(run):
        db = os.path.join(run, "mlflow.db")
        if tracking_uri is None:
            if not os.path.exists(db):
                raise FileNotFoundError(f"{run} holds no mlflow.db (pass --tracking-uri and a "
                                        "run id for another store)")
            tracking_uri = f"sqlite:///{os.path.abspath(db)}"
        client = MlflowClient(tracking_uri)
        runs = [r for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id], order_by=["start_time DESC"],
                                            max_results=1)]
        if not runs:
            raise FileNotFoundError(f"no MLflow run in {tracking_uri}")
        run_id = max(runs, key=lambda r: r.info.start_time).info.run_id
    else:
        client = MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    keys = client.get_run(run_id).data.metrics.keys()
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
               for k in keys}
    return history, run_id
