"""orbax checkpoints of the trainer state: LoRA weights and optimizer state (as a flat list of
arrays in pytree order) plus JSON metadata (step, data position, seed, MLflow run id, and a
fingerprint of the model/LoRA config that a resume must match).

In a multi-process job (:mod:`mtrl_jax.training.distributed`) every process writes its own
shards of the state: :meth:`Checkpoints.save` with ``collective=True``, called by all of them
with the global (sharded) arrays, is orbax's multi-process write (each process's shards in its
own OCDBT files, merged under one step folder). Reading needs no peers: process 0 restores the
whole arrays on the host and hands them to the mesh, so a checkpoint resumes with any process
count and mesh."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt, unreadable or does not fit the current config."""


class IncompatibleCheckpoint(CheckpointError):
    """A readable checkpoint of a different model, LoRA or optimizer configuration: resuming
    stops here rather than falling back to an older checkpoint of the same folder."""


class Checkpoints:
    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self._mngr = None

    @property
    def mngr(self):
        if self._mngr is None:
            import orbax.checkpoint as ocp

            os.makedirs(self.directory, exist_ok=True)
            extra = {}
            if jax.process_count() > 1:
                # a multi-process job: this manager reads (process 0, resuming) and deletes
                # without waiting for the others at orbax's barriers; writes are collective
                extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                    primary_host=0, active_processes={jax.process_index()})
            self._mngr = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.max_to_keep, create=not extra, **extra))
        return self._mngr

    def latest_step(self) -> int | None:
        if not os.path.isdir(self.directory):
            return None
        return self.mngr.latest_step()

    def save(self, step: int, tree: Any, meta: dict[str, Any], *,
             collective: bool = False) -> str:
        """Write ``tree``'s arrays and ``meta`` as checkpoint ``step``.

        ``collective``: every process of the job calls this at once with the same ``step`` and
        ``meta`` and its global arrays (sharded over the mesh); each writes the shards it
        holds. Otherwise the arrays are brought to the host and this process writes them."""
        import orbax.checkpoint as ocp

        leaves = jax.tree.leaves(tree)
        meta = dict(meta, num_leaves=len(leaves))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave({f"{i:05d}": x if collective else np.asarray(x)
                                         for i, x in enumerate(leaves)}),
            meta=ocp.args.JsonSave(meta))
        if not collective:
            if step in self.mngr.all_steps():  # a fresh run (resume=False) over an old folder
                self.mngr.delete(step)
            self.mngr.save(step, args=args, force=True)
            self.mngr.wait_until_finished()
            return os.path.join(self.directory, str(step))
        # every process of the job in one manager (orbax's barriers span them all); a step of
        # the same number from an earlier run is deleted by process 0 before (delete_step)
        mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, create=True))
        try:
            mngr.save(step, args=args, force=True)
            mngr.wait_until_finished()
        finally:
            mngr.close()
        self._mngr = None  # this process's reader caches the step list
        return os.path.join(self.directory, str(step))

    def delete_step(self, step: int) -> None:
        """Remove checkpoint ``step`` if there is one (a fresh run over an old folder)."""
        if step in self.steps():
            self.mngr.delete(step)
            self._mngr = None

    def steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        return sorted(self.mngr.all_steps())

    def restore_latest(self, like: Any, *, check: Callable[[dict[str, Any]], None] | None = None,
                       say: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, Any], Any] | None:
        """``(meta, arrays)`` of the newest usable checkpoint, or ``None`` when there is none.

        A newer checkpoint that is incomplete (a write cut short: an empty or partial folder)
        or unreadable is moved aside to ``<directory>_unusable/`` with a message, and the next
        older one is tried. ``check(meta)`` may raise :class:`IncompatibleCheckpoint` (a
        checkpoint of another configuration), which is raised as is: that is the user's folder
        mix-up, not damage. If every checkpoint is unusable, :class:`CheckpointError` lists why.
        """
        problems = []
        for step in reversed(self.steps()):
            try:
                meta = self.meta(step)
                if check is not None:
                    check(meta)
                return meta, self.restore(step, like)
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as e:
                problems.append(str(e))
                if say is not None:
                    say(f"checkpoint step {step} is incomplete or unreadable ({str(e)[:300]}); "
                        "moving it aside and trying the previous one")
                self._move_aside(step)
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.directory} (moved to "
                                  f"{self.directory}_unusable): " + " | ".join(problems))
        return None

    def _move_aside(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst_dir = self.directory + "_unusable"
        os.makedirs(dst_dir, exist_ok=True)
        if os.path.exists(src):
            shutil.move(src, os.path.join(dst_dir, f"{step}-{int(time.time())}"))
        self._mngr = None  # the manager caches the step list

    def meta(self, step: int) -> dict[str, Any]:
        import orbax.checkpoint as ocp

        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt or "
                                  f"unreadable (metadata): {type(e).__name__}: {e}") from e
        if "step" not in meta or "num_leaves" not in meta:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: metadata "
                                  f"lacks step/num_leaves: {sorted(meta)}")
        return meta

    def restore(self, step: int, like: Any) -> Any:
        """Arrays of checkpoint ``step`` in the structure (and shapes) of ``like``."""
        import orbax.checkpoint as ocp

        leaves, treedef = jax.tree.flatten(like)
        meta = self.meta(step)
        if meta["num_leaves"] != len(leaves):
            raise IncompatibleCheckpoint(
                f"checkpoint step {step} in {self.directory} holds {meta['num_leaves']} arrays "
                f"but this trainer state has {len(leaves)}: incompatible (a different LoRA "
                "target set or optimizer?)")
        # whole arrays on one device of this process, whatever mesh and process count wrote
        # them (a target sharding lets orbax read a multi-process checkpoint anywhere)
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=one)
                    for i, x in enumerate(leaves)}
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt or "
                                  f"does not fit this trainer state: {type(e).__name__}: "
                                  f"{str(e)[:500]}") from e
        arrays = out["state"]
        new = []
        for i, x in enumerate(leaves):
            a = arrays[f"{i:05d}"]
            if tuple(a.shape) != tuple(np.shape(x)):
                raise IncompatibleCheckpoint(f"checkpoint step {step}: array {i} has shape "
                                      f"{tuple(a.shape)}, the trainer expects {np.shape(x)}")
            new.append(jax.numpy.asarray(a, dtype=np.asarray(x).dtype))
        return jax.tree.unflatten(treedef, new)
