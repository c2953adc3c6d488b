"""The update of one training step: ``epochs x mini_batches`` optimizer steps of the LoRA
parameters on a packed batch, with the recipe's loss.

:func:`make_loss_fn` turns a config into ``loss_fn(model, batch) -> (loss, metrics)``: per-token
log-probs of the model (:func:`~mtrl_jax.models.logprobs.token_logprobs`, apart from any loss),
then :func:`~mtrl_jax.kernels.policy_loss` with exactly the recipe's kernel, its parameter
dataclass and the run's :class:`~mtrl_jax.kernels.LossConfig`.

:class:`Updater` runs the step: old log-probs (one forward per mini-batch when there is more
than one optimizer step, so the ratio moves off 1 after the first), reference log-probs with the
adapters off (when ``kl_coef > 0``), then the optimizer steps over the mini-batches of
:func:`~mtrl_jax.training.batch.minibatch_rows` (every real row once per epoch; a mini-batch
without a real row is not stepped: adam would still move the weights on a zero gradient).
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtrl_jax.kernels import PolicyLossInputs, policy_loss
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.training.batch import minibatch_rows
from mtrl_jax.training.distributed import LocalPlacement
from mtrl_jax.training.lora_step import make_lora_train_step
from mtrl_jax.training.packing import PackedBatch

ARRAYS = ("tokens", "positions", "segment_ids", "parent_ids", "loss_mask", "advantages",
          "behaviour_logprobs")


def make_loss_fn(config):
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``config`` (a
    :class:`~mtrl_jax.config.TrainConfig`). ``batch``: the packed arrays of :data:`ARRAYS`,
    plus ``old_logprobs`` (when absent, the current policy's, i.e. ratio 1) and
    ``ref_logprobs`` (when ``kl_coef > 0``)."""
    a = config.algorithm
    name, params, loss_cfg = a.loss.name, a.loss.params, config.loss_config
    use_ref = a.kl_coef > 0
    use_tis = loss_cfg.tis.mode != "none"
    exact_entropy = a.entropy_coef > 0

    def loss_fn(model, batch):
        stats = token_logprobs(model, batch["tokens"], batch["positions"],
                               batch["segment_ids"], with_entropy=exact_entropy,
                               remat=config.model.remat, parent_ids=batch.get("parent_ids"))
        old = batch["old_logprobs"] if "old_logprobs" in batch else \
            jax.lax.stop_gradient(stats.logprobs)
        inputs = PolicyLossInputs(
            logprobs=stats.logprobs, old_logprobs=old,
            advantages=batch["advantages"], loss_mask=batch["loss_mask"],
            segment_ids=batch["segment_ids"],
            behaviour_logprobs=batch["behaviour_logprobs"] if use_tis else None,
            ref_logprobs=batch["ref_logprobs"] if use_ref else None,
            entropy=stats.entropy)
        loss, metrics = policy_loss(name, inputs, params, loss_cfg)
        gap = jnp.abs(jax.lax.stop_gradient(stats.logprobs) - batch["behaviour_logprobs"])
        metrics["behaviour_logprob_gap_max"] = jnp.max(
            jnp.where(batch["loss_mask"] > 0, gap, 0.0))
        return loss, metrics

    return loss_fn


def lr_schedule(optimizer, steps: int) -> optax.Schedule:
    """The learning rate of each training step: a linear warm-up from 0 over
    ``warmup_steps``, then constant, or a cosine / linear decay from ``learning_rate`` to
    ``learning_rate * min_lr_ratio`` reached at training step ``steps - 1`` (held after it)."""
    o = optimizer
    peak = o.learning_rate
    span = max(steps - 1 - o.warmup_steps, 1)  # training steps after the warm-up's last
    if o.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, span, alpha=o.min_lr_ratio)
    elif o.decay == "linear":
        after = optax.linear_schedule(peak, peak * o.min_lr_ratio, span)
    else:
        after = optax.constant_schedule(peak)
    if o.warmup_steps > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, o.warmup_steps), after], [o.warmup_steps])
    return after


def make_optimizer(config) -> tuple[optax.GradientTransformation, Any]:
    """``(tx, schedule)``: AdamW with global-norm clipping; ``schedule(step)`` is the learning
    rate of training step ``step`` (:func:`lr_schedule`)."""
    o = config.optimizer
    schedule = lr_schedule(o, config.steps)
    per_step = o.mini_batches * o.epochs

    def lr(count):  # optax counts optimizer updates; the schedule is in training steps
        return schedule(count // per_step)

    tx = optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm) if o.max_grad_norm > 0 else optax.identity(),
        optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return tx, schedule


def _pad_rows(arrays: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Append all-zero rows (no segment: they add nothing to any loss) up to a multiple."""
    rows = arrays["tokens"].shape[0]
    extra = -rows % multiple
    if not extra:
        return arrays
    return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
            for k, v in arrays.items()}


class Updater:
    """The jitted functions of a run and the update of one step (see the module docstring).

    Args:
      graphdef: the model's graph (``split_lora``).
      tx: the optimizer.
      config: the run's :class:`~mtrl_jax.config.TrainConfig`.
      placement: how host rows become device arrays and back
        (:class:`~mtrl_jax.training.distributed.LocalPlacement` by default;
        :class:`~mtrl_jax.training.distributed.MeshPlacement` splits rows over a mesh, also
        across processes). The batch is padded with empty rows so that every mini-batch splits
        evenly over its row shards.
    """

    def __init__(self, graphdef, tx: optax.GradientTransformation, config, placement=None):
        self.config = config
        self.place = placement if placement is not None else LocalPlacement()
        self.train_step = make_lora_train_step(graphdef, tx, make_loss_fn(config), donate=False)

        @jax.jit
        def logprobs(lora, base, tokens, positions, segment_ids, parent_ids):
            return token_logprobs(nnx.merge(graphdef, lora, base), tokens, positions,
                                  segment_ids, parent_ids=parent_ids).logprobs

        @jax.jit
        def ref_logprobs(lora, base, tokens, positions, segment_ids, parent_ids):
            return token_logprobs(nnx.merge(graphdef, lora, base), tokens, positions,
                                  segment_ids, use_lora=False, parent_ids=parent_ids).logprobs

        self.logprobs = logprobs
        self.ref_logprobs = ref_logprobs

    def __call__(self, lora, opt_state, base, batch: PackedBatch
                 ) -> tuple[Any, Any, dict[str, float]]:
        """``(lora, opt_state, metrics)`` after the step's optimizer updates on ``batch``."""
        mesh = self.place.mesh
        # a placement's mesh is made current while the step traces and runs, so that the
        # Pallas attention kernel runs shard by shard on it (flash_attention's ``mesh``)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return self._update(lora, opt_state, base, batch)

    def _update(self, lora, opt_state, base, batch: PackedBatch
                ) -> tuple[Any, Any, dict[str, float]]:
        o = self.config.optimizer
        put, get = self.place.put, self.place.get
        arrays = _pad_rows({k: getattr(batch, k) for k in ARRAYS},
                           o.mini_batches * self.place.row_multiple)
        shape = arrays["tokens"].shape
        groups = minibatch_rows(arrays["segment_ids"], o.mini_batches)
        need_old = o.mini_batches * o.epochs > 1
        olds, refs = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        for rows in groups:  # one mini-batch shape at a time (the shape every step compiles)
            args = (lora, base, *(put(arrays[k][rows])
                                  for k in ("tokens", "positions", "segment_ids", "parent_ids")))
            if need_old:
                olds[rows] = get(self.logprobs(*args))
            if self.config.algorithm.kl_coef > 0:
                refs[rows] = get(self.ref_logprobs(*args))
        if need_old:
            arrays["old_logprobs"] = olds
        if self.config.algorithm.kl_coef > 0:
            arrays["ref_logprobs"] = refs
        acc: dict[str, list[float]] = {}
        skipped = empty = 0
        for _ in range(o.epochs):
            for rows in groups:
                if not (arrays["segment_ids"][rows] > 0).any():
                    empty += 1
                    continue
                mb = {k: put(v[rows]) for k, v in arrays.items()}
                lora, opt_state, loss, aux, gnorm = self.train_step(lora, opt_state, base, mb)
                aux = {k: float(v) for k, v in aux.items()}
                skipped += int(aux.pop("skipped", 0.0))
                if not math.isfinite(float(loss)):
                    print("[mtrl] non-finite loss; update skipped", file=sys.stderr)
                for k, v in {"loss": float(loss), "grad_norm": float(gnorm), **aux}.items():
                    acc.setdefault(k, []).append(v)
        if "behaviour_logprob_gap_max" in acc:  # a max, not a mean, over the updates
            acc["behaviour_logprob_gap_max"] = [max(acc["behaviour_logprob_gap_max"])]
        out = {f"train/{k}": float(np.mean(v)) for k, v in acc.items()}
        out.update({
            "train/skipped_updates": float(skipped),
            "train/empty_minibatches": float(empty),
            "train/packing_efficiency": batch.efficiency,
            "train/rows": float(batch.shape[0]), "train/row_length": float(batch.shape[1]),
            "train/tokens": float(batch.num_tokens),
            # tokens a shared prefix saved: 1 - packed / flat (0 with flat packing)
            "train/shared_prefix_saving": 1.0 - batch.num_tokens / max(1, batch.flat_tokens),
        })
        return lora, opt_state, out
