"""Where a run's metrics, parameters and trajectories go: one small protocol, three stores.

- :class:`~mtrl_jax.tracking.mlflow.MLflowTracker` -- the default: an MLflow run (a sqlite store
  in the run folder, or any tracking URI), trajectories as traces.
- :class:`InMemoryTracker` -- everything kept in Python lists and dicts (tests, notebooks).
- :class:`NoOpTracker` -- discards everything.
- :class:`~mtrl_jax.tracking.jsonl.JsonlTracker` -- JSON-lines files in the run folder; what
  ``mlflow`` becomes, with one warning, where MLflow is not installed.

Callers use only the :class:`Tracker` protocol; none reaches into a store's client. Chosen by the
recipe's ``tracker`` key through :func:`make_tracker`.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

from mtrl_jax.tracking.memory import InMemoryTracker, NoOpTracker

__all__ = ["InMemoryTracker", "NoOpTracker", "Tracker", "default_tracking_uri", "make_tracker"]


@runtime_checkable
class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every point logged for ``name`` in this run (resumed runs
        included)."""
        ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_trajectory(self, traj, *, step: int, kind: str) -> str | None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def url(self) -> str: ...


def default_tracking_uri(output_dir: str) -> str:
    from mtrl_jax.tracking.mlflow import default_tracking_uri as uri

    return uri(output_dir)


def make_tracker(kind: str, *, output_dir: str, experiment_name: str,
                 run_name: str | None = None, run_id: str | None = None,
                 tracking_uri: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
    """``kind``: ``mlflow`` (``tracking_uri`` or the run folder's sqlite store; ``run_id``
    resumes a run; ``tags`` are set on a new run), ``jsonl``, ``memory`` or ``none``. Without
    an importable ``mlflow``, ``mlflow`` means ``jsonl`` (one warning)."""
    if kind == "mlflow" and not mlflow_available():
        global _WARNED
        if not _WARNED:
            warnings.warn("mlflow is not installed: metrics and trajectories go to JSON lines "
                          f"in {output_dir}/tracking instead (tracker: jsonl)", stacklevel=2)
            _WARNED = True
        kind = "jsonl"
    if kind == "jsonl":
        from mtrl_jax.tracking.jsonl import JsonlTracker

        tracker = JsonlTracker(output_dir, run_name=run_name)
        tracker.set_tags(tags or {})
        return tracker
    if kind == "mlflow":
        from mtrl_jax.tracking.mlflow import MLflowTracker

        return MLflowTracker(tracking_uri or default_tracking_uri(output_dir), experiment_name,
                             run_name=run_name, run_id=run_id, tags=tags)
    if kind == "memory":
        return InMemoryTracker(run_name=run_name)
    if kind == "none":
        return NoOpTracker()
    raise ValueError(f"unknown tracker {kind!r}; use mlflow, jsonl, memory or none")


_WARNED = False


def mlflow_available() -> bool:
    """Whether ``import mlflow`` works (checked when a tracker is made, never at import)."""
    import importlib.util
    import sys

    if "mlflow" in sys.modules:
        return sys.modules["mlflow"] is not None
    return importlib.util.find_spec("mlflow") is not None
