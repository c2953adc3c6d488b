"""Rotary position embeddings with the scalings HF configs declare.

Frequencies follow Su et al. (2021, "RoFormer"): ``inv_freq_i = theta^(-2i/d)``, with
- ``linear`` (position interpolation, Chen et al., 2023): ``inv_freq / factor``;
- ``llama3`` (Meta, Llama 3.1): long wavelengths divided by ``factor``, short ones kept, a smooth
  ramp in between, set by ``low_freq_factor``, ``high_freq_factor`` and the original context;
- ``yarn`` (Peng et al., 2023, "YaRN"): a per-dimension ramp between interpolated and
  extrapolated frequencies, and an attention temperature applied to cos/sin.

The rotation uses the "rotate half" layout of HF checkpoints: a head vector ``[x1, x2]`` (halves)
becomes ``[x1 cos - x2 sin, x2 cos + x1 sin]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.models.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[head_dim // 2] f32`` and the cos/sin scale (1 unless YaRN)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    # float32 throughout, as HF computes them, so that angles match bit for bit where possible
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None or s.rope_type == "default":
        return inv_freq, 1.0
    if s.rope_type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32), 1.0
    if s.rope_type == "llama3":
        old_ctx = s.original_max_position_embeddings
        low_wl = old_ctx / s.low_freq_factor
        high_wl = old_ctx / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wl, inv_freq / s.factor, inv_freq)
        smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if s.rope_type == "yarn":
        factor = s.factor
        if factor is None:
            factor = cfg.max_position_embeddings / s.original_max_position_embeddings

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = s.attention_factor
        if attn is None:
            if s.mscale and s.mscale_all_dim:
                attn = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
            else:
                attn = mscale(factor)
        beta_fast = s.beta_fast or 32
        beta_slow = s.beta_slow or 1

        def correction_dim(rotations):
            return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                    ) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = np.float32(base) ** exponents
        extrap = 1.0 / pos_freqs
        interp = 1.0 / (factor * pos_freqs)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrap_weight = 1 - ramp
        inv = interp * (1 - extrap_weight) + extrap * extrap_weight
        return inv.astype(np.float32), float(attn)
    raise ValueError(f"unsupported rope_type {s.rope_type!r}")


def rope_angles(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0):
    """cos and sin ``[..., head_dim // 2] f32`` for integer ``positions [...]``."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, heads, head_dim]`` by ``cos, sin [B, L, head_dim // 2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def apply_rope_t(x: jax.Array, cos_t: jax.Array, sin_t: jax.Array) -> jax.Array:
    """Feature-major :func:`apply_rope`: ``x [heads, head_dim, N]``, ``cos_t, sin_t
    [head_dim // 2, N]`` (one position per column)."""
    half = x.shape[1] // 2
    x1, x2 = x[:, :half], x[:, half:]
    c = cos_t[None].astype(x.dtype)
    s = sin_t[None].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1)
