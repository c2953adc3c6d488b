"""A tracker that needs nothing installed: JSON-lines files in the run folder.

``<output_dir>/tracking/``: ``params.json``, ``tags.json``, ``metrics.jsonl`` (one
``{"step", "name", "value"}`` per line), ``trajectories.jsonl`` (one line per logged episode:
its kind, step, task, reward, strict score, turns and messages) and ``status``. A resumed run
appends to the same files (``metric_history`` reads them back, so a resumed run knows what it
logged). Chosen with ``tracker: jsonl``, and used in place of MLflow, with one warning, when
``mlflow`` cannot be imported (e.g. an accelerator image without it).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any


class JsonlTracker:
    def __init__(self, output_dir: str, *, run_name: str | None = None):
        self.folder = os.path.join(output_dir, "tracking")
        os.makedirs(self.folder, exist_ok=True)
        id_path = os.path.join(self.folder, "run_id")
        if os.path.exists(id_path):  # a resumed run continues its files
            with open(id_path) as f:
                self.run_id = f.read().strip()
        else:
            self.run_id = uuid.uuid4().hex
            with open(id_path, "w") as f:
                f.write(self.run_id)
        self.run_name = run_name
        self._history: dict[str, list[tuple[int, float]]] = {}
        path = self._path("metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        self._history.setdefault(rec["name"], []).append(
                            (int(rec["step"]), float(rec["value"])))
        self.set_tags({"run_name": run_name} if run_name else {})
        self._write("status", "RUNNING")

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _write(self, name: str, text: str) -> None:
        with open(self._path(name), "w") as f:
            f.write(text)

    def _merge_json(self, name: str, values: dict[str, Any], *, keep_old: bool) -> None:
        path = self._path(name)
        old: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        new = {**values, **old} if keep_old else {**old, **values}
        self._write(name, json.dumps(new, indent=1, default=str))

    def log_params(self, params: dict[str, Any]) -> None:
        self._merge_json("params.json", params, keep_old=True)  # as MLflow: params are fixed

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        lines = []
        for k, v in metrics.items():
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                continue
            self._history.setdefault(k, []).append((step, float(v)))
            lines.append(json.dumps({"step": step, "name": k, "value": float(v)}))
        if lines:
            with open(self._path("metrics.jsonl"), "a") as f:
                f.write("\n".join(lines) + "\n")

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        return list(self._history.get(name, []))

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._merge_json("tags.json", {k: str(v) for k, v in tags.items()}, keep_old=False)

    def log_trajectory(self, traj, *, step: int, kind: str) -> str | None:
        rec = {"kind": kind, "step": step, "task_id": traj.task_id,
               "episode_id": traj.episode_id, "reward": traj.reward,
               "strict_score": traj.strict_score, "finish_reason": traj.finish_reason,
               "num_turns": traj.num_turns,
               "tool_calls": [{"turn": c.turn, "name": c.name, "arguments": c.arguments,
                               "error": c.error} for c in traj.tool_calls],
               "messages": traj.messages}
        with open(self._path("trajectories.jsonl"), "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        return f"{self.run_id}/{traj.episode_id}"

    def end(self, status: str = "FINISHED") -> None:
        self._write("status", status)

    def url(self) -> str:
        return f"{self.folder} (JSON lines: metrics.jsonl, trajectories.jsonl)"
