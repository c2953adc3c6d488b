"""Entry checks for kernels: fail at trace time with the argument's name and shape.

Shapes are static under ``jax.jit``, so every check here runs while tracing and costs nothing
at run time. Messages name the kernel, the argument and the shapes involved, e.g.
``ppo: 'old_logprobs' has shape (4, 16) but 'logprobs' has shape (4, 8)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(where: str, name: str, x, rank: int | tuple[int, ...]) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    if x is None:
        raise ValueError(f"{where}: {name!r} is required (expected rank {ranks})")
    if len(_shape(x)) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(
            f"{where}: {name!r} must have rank {want}, got shape {_shape(x)}"
        )


def check_same_shape(where: str, ref_name: str, ref, **others) -> None:
    """Every array in ``others`` (skipping ``None``) must have the shape of ``ref``."""
    want = _shape(ref)
    for name, x in others.items():
        if x is None:
            continue
        if _shape(x) != want:
            raise ValueError(
                f"{where}: {name!r} has shape {_shape(x)} but {ref_name!r} has shape {want}"
            )


def _check_kind(where: str, kind, label: str, arrays: dict) -> None:
    for name, x in arrays.items():
        if x is None:
            continue
        dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
        if not jnp.issubdtype(dtype, kind):
            raise ValueError(f"{where}: {name!r} must be {label}, got dtype {dtype}")


def check_floating(where: str, **arrays) -> None:
    _check_kind(where, jnp.floating, "floating point", arrays)


def check_integer(where: str, **arrays) -> None:
    _check_kind(where, jnp.integer, "an integer array", arrays)
