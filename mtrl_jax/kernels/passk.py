"""Unbiased pass@k and pass^k estimators.

Given ``n`` samples of a task of which ``c`` succeed:

- pass@k -- the probability that at least one of ``k`` samples drawn without replacement
  succeeds: ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021, "Evaluating Large Language Models
  Trained on Code", eq. 1). Computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``, which never
  forms a large binomial.
- pass^k -- the probability that all ``k`` draws succeed: ``C(c, k) / C(n, k)`` (Yao et al.,
  2024, "tau-bench"), computed as ``prod_{i=0}^{k-1} (c - i) / (n - i)``.

Both exist as exact host-side functions (Python ints/floats, used by the evaluator) and as
vectorised JAX kernels over arrays of tasks (used inside jitted metrics); the JAX versions work
in log space with ``gammaln`` (f32: absolute error of a few 1e-6; use the host functions
for reported figures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from mtrl_jax.kernels import _validate as v


def _check_nck(n: int, c: int, k: int) -> None:
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task (exact up to float rounding)."""
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k for one task: probability that ``k`` draws without replacement all succeed."""
    _check_nck(n, c, k)
    if c < k:
        return 0.0
    i = np.arange(k, dtype=np.float64)
    return float(np.prod((c - i) / (n - i)))


def _log_comb(a: jax.Array, b: jax.Array) -> jax.Array:
    return gammaln(a + 1.0) - gammaln(b + 1.0) - gammaln(a - b + 1.0)


def _prepare(where: str, n, c, k):
    n = jnp.asarray(n)
    c = jnp.asarray(c)
    v.check_same_shape(where, "n", n, c=c)
    nf = n.astype(jnp.float32)
    cf = c.astype(jnp.float32)
    kf = jnp.asarray(k, jnp.float32)
    return nf, cf, kf


def pass_at_k_jax(n: jax.Array, c: jax.Array, k: int | jax.Array) -> jax.Array:
    """Vectorised unbiased pass@k: ``n``, ``c`` arrays of the same shape; ``k`` scalar.

    Entries with ``k > n`` (not enough samples) are NaN; ``n - c < k`` gives exactly 1.
    """
    n, c, k = _prepare("pass_at_k_jax", n, c, k)
    safe_fail = jnp.maximum(n - c, k)
    log_ratio = _log_comb(safe_fail, k) - _log_comb(jnp.maximum(n, k), k)
    out = jnp.where(n - c < k, 1.0, -jnp.expm1(log_ratio))
    return jnp.where(k > n, jnp.nan, out)


def pass_hat_k_jax(n: jax.Array, c: jax.Array, k: int | jax.Array) -> jax.Array:
    """Vectorised pass^k ``C(c, k) / C(n, k)``; NaN where ``k > n``."""
    n, c, k = _prepare("pass_hat_k_jax", n, c, k)
    log_ratio = _log_comb(jnp.maximum(c, k), k) - _log_comb(jnp.maximum(n, k), k)
    out = jnp.where(c < k, 0.0, jnp.exp(log_ratio))
    return jnp.where(k > n, jnp.nan, out)
