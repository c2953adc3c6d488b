"""orbax checkpoints of the trainer state: LoRA weights and optimizer state (as a flat list of
arrays in pytree order) plus JSON metadata (step, data position, seed, MLflow run id, and a
fingerprint of the model/LoRA config that a resume must match)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt, unreadable or does not fit the current config."""


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
            self._mngr = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.max_to_keep, create=True))
        return self._mngr

    def latest_step(self) -> int | None:
        if not os.path.isdir(self.directory):
            return None
        return self.mngr.latest_step()

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> str:
        import orbax.checkpoint as ocp

        leaves = jax.tree.leaves(tree)
        arrays = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        meta = dict(meta, num_leaves=len(leaves))
        if step in self.mngr.all_steps():  # a fresh run (resume=False) over an old folder
            self.mngr.delete(step)
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self.mngr.wait_until_finished()
        return os.path.join(self.directory, str(step))

    def latest_meta(self) -> dict[str, Any] | None:
        step = self.latest_step()
        if step is None:
            return None
        return self.meta(step)

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
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds {meta['num_leaves']} arrays "
                f"but this trainer state has {len(leaves)}: incompatible (a different LoRA "
                "target set or optimizer?)")
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
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
                raise CheckpointError(f"checkpoint step {step}: array {i} has shape "
                                      f"{tuple(a.shape)}, the trainer expects {np.shape(x)}")
            new.append(jax.numpy.asarray(a, dtype=np.asarray(x).dtype))
        return jax.tree.unflatten(treedef, new)
