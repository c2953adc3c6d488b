"""Where a run's metrics, parameters and trajectories go: one small protocol, three stores.

- :class:`~mtrl_jax.tracking.mlflow.MLflowTracker` -- the default: an MLflow run (a sqlite store
  in the run folder, or any tracking URI), trajectories as traces.
- :class:`InMemoryTracker` -- everything kept in Python lists and dicts (tests, notebooks).
- :class:`NoOpTracker` -- discards everything.

Callers use only the :class:`Tracker` protocol; none reaches into a store's client. Chosen by the
recipe's ``tracker`` key through :func:`make_tracker`.
"""

from __future__ import annotations

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
    resumes a run; ``tags`` are set on a new run), ``memory`` or ``none``."""
    if kind == "mlflow":
        from mtrl_jax.tracking.mlflow import MLflowTracker

        return MLflowTracker(tracking_uri or default_tracking_uri(output_dir), experiment_name,
                             run_name=run_name, run_id=run_id, tags=tags)
    if kind == "memory":
        return InMemoryTracker(run_name=run_name)
    if kind == "none":
        return NoOpTracker()
    raise ValueError(f"unknown tracker {kind!r}; use mlflow, memory or none")
