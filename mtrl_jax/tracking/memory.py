"""Trackers without a store: in memory (tests, notebooks) and no-op."""

from __future__ import annotations

import math
import uuid
from typing import Any


class InMemoryTracker:
    """Keeps everything: ``params``, ``metrics`` (name -> ``[(step, value)]``), ``tags``,
    ``trajectories`` (``(kind, step, trajectory)``) and the final ``status``."""

    def __init__(self, run_name: str | None = None):
        self.run_id = uuid.uuid4().hex
        self.run_name = run_name
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}
        self.trajectories: list[tuple[str, int, Any]] = []
        self.status = "RUNNING"

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in params.items():
            self.params.setdefault(k, v)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self.metrics.setdefault(k, []).append((step, float(v)))

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        return list(self.metrics.get(name, []))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_trajectory(self, traj, *, step: int, kind: str) -> str | None:
        self.trajectories.append((kind, step, traj))
        return f"memory-{len(self.trajectories)}"

    def end(self, status: str = "FINISHED") -> None:
        self.status = status

    def url(self) -> str:
        return f"in-memory run {self.run_id}"


class NoOpTracker:
    """Discards everything."""

    run_id = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        return []

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_trajectory(self, traj, *, step: int, kind: str) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass

    def url(self) -> str:
        return "no tracking (tracker: none)"
