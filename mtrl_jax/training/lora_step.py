"""A jitted LoRA-only optimisation step over a split NNX model.

The model is split once into ``(graphdef, lora, base)`` (:func:`mtrl_jax.models.split_lora`).
The step differentiates ``loss_fn(model, batch)`` with respect to the LoRA parameters only; the
base weights are an input that is never updated (and, under sharding, never copied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_lora_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                         loss_fn: LossFn, *, donate: bool = True):
    """``step(lora, opt_state, base, batch) -> (lora, opt_state, loss, aux, grad_norm)``.

    ``lora`` and ``opt_state`` are donated (updated in place) unless ``donate=False``.
    """

    def step(lora, opt_state, base, batch):
        def f(lora):
            return loss_fn(nnx.merge(graphdef, lora, base), batch)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(lora)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        return lora, opt_state, loss, aux, grad_norm

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
