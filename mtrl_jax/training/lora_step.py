"""A jitted LoRA-only optimisation step over a split NNX model.

The model is split once into ``(graphdef, lora, base)`` (:func:`mtrl_jax.models.split_lora`).
The step differentiates ``loss_fn(model, batch)`` with respect to the LoRA parameters only; the
base weights are an input that is never updated (and, under sharding, never copied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_lora_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                         loss_fn: LossFn, *, donate: bool = True, skip_nonfinite: bool = True):
    """``step(lora, opt_state, base, batch) -> (lora, opt_state, loss, aux, grad_norm)``.

    ``lora`` and ``opt_state`` are donated (updated in place) unless ``donate=False``. With
    ``skip_nonfinite`` a NaN/inf loss or gradient norm leaves both unchanged and
    ``aux["skipped"]`` is 1.0 (else 0.0).
    """

    def step(lora, opt_state, base, batch):
        def f(lora):
            return loss_fn(nnx.merge(graphdef, lora, base), batch)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(lora)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(ok, new, old)
            new_lora = jax.tree.map(keep, new_lora, lora)
            new_opt = jax.tree.map(keep, new_opt, opt_state)
            aux = dict(aux, skipped=1.0 - ok.astype(jnp.float32))
        return new_lora, new_opt, loss, aux, grad_norm

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
