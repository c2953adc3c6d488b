"""LoRA configuration and the split of a model into its LoRA and base parameters.

LoRA (Hu et al., 2021): a frozen linear map ``W`` gains a trainable low-rank update,
``y = x W + (alpha / r) * (x A) B``, with ``A [in, r]`` initialised like PEFT (uniform
+-1/sqrt(in)) and ``B [r, out]`` zero, so a fresh adapter leaves the model unchanged.

The LoRA parameters are ``nnx.LoRAParam`` variables. :func:`split_lora` returns them as their own
pytree (a few MB for a 7B model at r=16) -- the only thing the optimizer updates, the only thing
checkpoints and weight syncs to rollout workers carry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``lora_rank`` (0 disables LoRA), ``lora_alpha`` and the target projections.

    Targets use short names: ``q k v o`` (attention) and ``gate up down`` (MLP); the PEFT export
    maps them to ``q_proj`` ... ``down_proj``.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora rank must be >= 0, got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; valid: {LORA_TARGETS}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def rank_for(self, target: str) -> int:
        return self.rank if target in self.targets else 0


#: Filter selecting the frozen base weights (LoRAParam subclasses Param).
BASE_FILTER = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, lora_params, base_params)``; ``nnx.merge(graphdef, lora, base)`` rebuilds."""
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, lora, base


def lora_state_dict(model: nnx.Module) -> dict[str, Any]:
    """The LoRA parameters as a plain nested dict of arrays (cheap to copy or send)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def num_lora_params(model: nnx.Module) -> int:
    import jax

    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
