"""What a recipe's ``auto`` model settings mean on the backend JAX runs on.

- ``model.dtype`` / ``model.param_dtype: auto``: ``bfloat16`` on GPU and TPU (activations,
  matmuls and the frozen base weights; LoRA weights and the optimizer state stay float32, and
  log-probs and softmax are computed in float32 everywhere), ``float32`` on CPU (XLA:CPU's
  bf16 matmuls are not faster, and the CPU tests compare against float32 references).
- ``model.attention: auto``: the XLA path on CPU (its dense masked attention is the fastest
  there at the demo's row lengths); on a single GPU the Pallas kernel of
  :mod:`mtrl_jax.models.flash_attention`, after a one-time probe that compiles and checks it
  on a tiny input (a failure falls back to XLA with one warning naming the error); on TPU the
  XLA path (the kernel is checked in interpret mode only; ``attention: pallas`` forces it);
  on several devices the XLA path too: there the kernel runs under ``shard_map`` (rows over
  ``data`` x ``fsdp``, heads over ``tensor``; tested on 4 CPU devices), which
  ``attention: pallas`` selects, but it has not been measured on a multi-device machine.

The CPU-only machinery is chosen by the backend elsewhere: the feature-major decode step and
the C++ attention FFI kernel only when ``jax.default_backend() == "cpu"``
(:mod:`mtrl_jax.models.decoding`), the glibc re-exec only when no accelerator plugin is
installed or ``JAX_PLATFORMS`` asks for the CPU (:mod:`mtrl_jax.runtime`).
"""

from __future__ import annotations

import functools
import warnings

import jax

ACCELERATORS = ("gpu", "tpu")


def backend() -> str:
    return jax.default_backend()


def resolve_dtype(value: str, platform: str | None = None) -> str:
    if value != "auto":
        return value
    return "bfloat16" if (platform or backend()) in ACCELERATORS else "float32"


def resolve_attention(value: str, platform: str | None = None) -> str:
    if value != "auto":
        return value
    platform = platform or backend()
    if platform != "gpu" or jax.device_count() > 1:
        # several devices: the kernel runs under shard_map there (flash_attention's mesh), but
        # it has not been measured on a multi-device machine; ``attention: pallas`` forces it
        return "xla"
    ok, err = _pallas_probe()
    if ok:
        return "pallas"
    warnings.warn(f"model.attention: auto: the Pallas attention kernel failed its probe on this "
                  f"GPU ({err}); using the XLA path", RuntimeWarning, stacklevel=2)
    return "xla"


@functools.cache
def _pallas_probe() -> tuple[bool, str]:
    """Compile the kernel's forward and backward on a tiny packed row and compare with the
    XLA path: ``(ok, error)``."""
    import jax.numpy as jnp
    import numpy as np

    from mtrl_jax.models.flash_attention import flash_attention
    from mtrl_jax.models.transformer import attend, packed_mask

    try:
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(1, 64, 4, 32)), jnp.bfloat16)
        k = jnp.asarray(rng.normal(size=(1, 64, 2, 32)), jnp.bfloat16)
        v = jnp.asarray(rng.normal(size=(1, 64, 2, 32)), jnp.bfloat16)
        seg = jnp.asarray([[1] * 24 + [2] * 30 + [0] * 10], jnp.int32)
        ours = jax.jit(lambda q, k, v: flash_attention(q, k, v, seg, block_q=16, block_k=16))
        ref = attend(q, k, v, packed_mask(seg)).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(ours(q, k, v).astype(jnp.float32) - ref)[:, :54]))
        jax.grad(lambda q: jnp.sum(ours(q, k, v).astype(jnp.float32)))(q).block_until_ready()
        if not err < 0.05:
            return False, f"max error {err:.3g} against the XLA path"
        return True, ""
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
