"""One Flax NNX decoder for the Llama, Qwen2/2.5 and Qwen3 layouts.

Pre-norm blocks: ``h = x + Attn(RMSNorm(x))``, ``y = h + SwiGLU(RMSNorm(h))``; grouped-query
attention with RoPE; optional q/k RMSNorm per head (Qwen3), q/k/v bias (Qwen2), tied or untied
LM head. Weights are stored as ``kernel [in, out]`` (HF stores ``weight [out, in]``; the
checkpoint code transposes).

Two entry points:

- :meth:`CausalLM.hidden_states` over packed rows ``tokens [B, L]`` with ``positions`` (restart
  at 0 in every segment) and ``segment_ids`` (0 = padding): causal attention that never crosses
  a segment. Used for training and log-probs.
- :meth:`CausalLM.extend` with a KV cache: append ``T`` tokens per sequence (``num_new [B]`` of
  them real) after the ``cache.lengths`` already there. Prefill, decoding (``T = 1``) and the
  next turn of a conversation are all ``extend``.

``use_lora=False`` runs the same weights with the adapters switched off -- the reference policy
for a KL term, without a second copy of the base weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtrl_jax.models import cpu_kernels
from mtrl_jax.models.config import ModelConfig
from mtrl_jax.models.lora import LoRAConfig
from mtrl_jax.models.rope import apply_rope, apply_rope_t, rope_angles, rope_frequencies

NEG_INF = -1e30
#: Query block of the packed (causal) attention; see :func:`attend`. Smaller blocks skip more
#: of the upper triangle, but in the whole train step (8 x 1024 tokens) blocks of 64 or 128 were
#: no faster than 256 (per-round ratios within this machine's noise; 2026-11-27, LOG), while
#: the program to compile grows with the number of blocks.
ATTENTION_BLOCK = 256


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (as HF does)."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """Normalise over ``axis`` (the feature axis; the last one except in the
        feature-major decode step, see :meth:`CausalLM.decode_logits`)."""
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + self.eps)
        weight = self.weight[...].astype(dtype)
        if axis not in (-1, x.ndim - 1):
            weight = weight.reshape(weight.shape + (1,) * (x.ndim - 1 - axis % x.ndim))
        return weight * x32.astype(dtype)


class Linear(nnx.Module):
    """``y = x W (+ b) (+ (alpha/r) x A B)``; ``W [in, out]`` frozen when LoRA is on."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, lora_rank: int,
                 lora_scale: float, cfg: ModelConfig, lora_dtype, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        pdt = cfg.jnp_param_dtype
        self.kernel = nnx.Param(
            (init_std * jax.random.normal(rngs.params(), (in_features, out_features))).astype(pdt)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), pdt)) if bias else None
        self.dtype = cfg.jnp_dtype
        self.lora_scale = lora_scale
        #: ``True`` once :func:`prepare_decode_weights` stored ``kernel`` as ``[out, in]``.
        self.transposed = False
        if lora_rank > 0:
            bound = 1.0 / (in_features ** 0.5)
            self.lora_a = nnx.LoRAParam(jax.random.uniform(
                rngs.params(), (in_features, lora_rank), lora_dtype, -bound, bound))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, out_features), lora_dtype))
        else:
            self.lora_a = None
            self.lora_b = None

    def __call__(self, x: jax.Array, use_lora: bool = True) -> jax.Array:
        # Flatten to [tokens, in]: XLA:CPU runs 2-D matmuls far faster than contractions over
        # two leading dims (the LoRA weight gradients, [B, L, in] x [B, L, r], were 5x slower).
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        if self.transposed:
            y = _matmul_nt(x, self.kernel[...].astype(self.dtype))
        else:
            y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if use_lora and self.lora_a is not None:
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            y = y + ((x @ a) @ b) * jnp.asarray(self.lora_scale, self.dtype)
        return y.reshape(*lead, y.shape[-1])

    def apply_t(self, xt: jax.Array) -> jax.Array:
        """Feature-major: ``y^T [out, N] = W^T x^T`` for ``xt [in, N]``, the weight as the left
        operand (kernel stored ``[out, in]`` by :func:`prepare_decode_weights`; adapters folded
        or off). See :meth:`CausalLM.decode_logits`."""
        if not self.transposed:
            raise ValueError("Linear.apply_t needs the kernel stored [out, in] "
                             "(prepare_decode_weights(..., transpose=True))")
        y = self.kernel[...].astype(self.dtype) @ xt.astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)[:, None]
        return y

    def fold_adapters(self) -> None:
        """In place: ``kernel += (alpha/r) A B`` (no-op without adapters; adapters stay)."""
        if self.lora_a is None:
            return
        w = self.kernel[...]
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)
        if self.transposed:
            delta = delta.T
        self.kernel[...] = (w.astype(jnp.float32) + self.lora_scale * delta).astype(w.dtype)


def _matmul_nt(x: jax.Array, w_t: jax.Array, preferred=None) -> jax.Array:
    """``x [..., K] @ w_t[N, K]^T`` without materialising the transpose."""
    return jax.lax.dot_general(x, w_t, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=preferred)


def prepare_decode_weights(model: CausalLM, *, fold: bool, transpose: bool,
                           attention_kernel: bool = False) -> None:
    """In place, on a traced copy of the weights (inside jit): the weights the sampler's decode
    steps run fastest with. Call the model with ``use_lora=False`` afterwards; outputs equal the
    unprepared model's (with ``fold``: its ``use_lora=True`` outputs) up to f32 rounding.

    ``fold``: ``W + (alpha/r) A B`` in every adapted :class:`Linear` (a decode step then runs 4
    matmuls per layer instead of 18). ``transpose``: every kernel stored as ``[out, in]``, and an
    untied LM head as ``[vocab, hidden]``. At the few dozen rows of a decode step XLA:CPU's
    matmul with the weight as ``[N, K]`` runs ~1.4x faster than with ``[K, N]`` (measured
    2026-11-27, experiments/LOG.md); it costs a transposed copy of the weights for the call, so
    the sampler asks for it on CPU only.

    ``attention_kernel`` (with ``transpose``, f32 caches): the decode steps' attention runs in
    the C++ kernel of :mod:`mtrl_jax.models.cpu_kernels` when it builds here (else a warning and
    XLA's formulation): it uses both cores and reads each row's own slots only (measured
    2026-11-27, fourth session, experiments/LOG.md).
    """
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, Linear) or node.transposed:
            continue
        if fold:
            node.fold_adapters()
        if transpose:
            node.kernel.set_value(node.kernel[...].T)
            node.transposed = True
    if not transpose or not isinstance(model, CausalLM):
        return
    if model.lm_head is not None and not model.head_transposed:
        model.lm_head.set_value(model.lm_head[...].T)
        model.head_transposed = True
    model.feature_major_decode = True
    model.decode_attention_kernel = bool(
        attention_kernel and model.cfg.jnp_dtype == jnp.float32
        and cpu_kernels.decode_attention_available())


def fold_lora(model: nnx.Module) -> None:
    """In place: ``kernel += (alpha/r) A B`` in every adapted :class:`Linear` (adapters stay, so
    call the model with ``use_lora=False`` afterwards). Used inside jit on a traced copy of the
    weights, e.g. by the sampler: a decode step then runs 4 matmuls per layer instead of 18."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            node.fold_adapters()


class KVCache(NamedTuple):
    """Keys ``[B, kv_heads, head_dim, S]`` and values ``[B, kv_heads, S, head_dim]``, one array
    per layer (a tuple, so that a step updates each in place), and the number of tokens held per
    sequence ``lengths [B]``.

    Both layouts let a decode step read the cache as a stream without a transpose: the scores
    ``q . k`` accumulate over ``head_dim`` rows of ``S`` contiguous keys, the output over ``S``
    rows of ``head_dim`` contiguous values (keys as ``[.., S, D]`` made the score pass ~1.4x
    slower: a reduction over the innermost 64 entries; measured 2026-11-27, experiments/LOG.md)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
    dtype = cfg.jnp_dtype if dtype is None else dtype
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch,), jnp.int32))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           causal_block: int | None = None) -> jax.Array:
    """Grouped-query self-attention over packed rows (training and log-probs).

    ``q [B, T, H, D]``, ``k, v [B, T, KV, D]``, ``mask [B, T, T]`` (already causal). Scores and
    softmax in float32; a query with no visible key (padding) attends uniformly and its output
    is ignored downstream. With ``causal_block`` queries go in blocks of that many rows and each
    block only scores the keys up to its last row, skipping the upper triangle (about half the
    work for long rows).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    groups = h // kv
    # Layout: the G query heads that share a kv head are stacked along the query rows,
    # q [B, KV, G * T, D] against k, v [B, KV, S, D], so every block is one plain batched matmul
    # and k/v are neither repeated per head nor re-transposed per block. Versus repeating k/v
    # to [B, H, S, D]: fwd+bwd per layer 3% (min) / 11% (median) faster, the whole train step
    # per-round median 1.08x (2026-11-27, experiments/LOG.md).
    qg = jnp.transpose(q.reshape(b, t, kv, groups, d), (0, 2, 3, 1, 4))  # [B, KV, G, T, D]
    kt = jnp.transpose(k, (0, 2, 1, 3))  # [B, KV, S, D]
    vt = jnp.transpose(v, (0, 2, 1, 3))
    scale = d ** -0.5

    def block(q_blk, k_blk, v_blk, m_blk):
        rows = q_blk.shape[3]
        scores = jnp.einsum("bkmd,bksd->bkms", q_blk.reshape(b, kv, groups * rows, d), k_blk,
                            preferred_element_type=jnp.float32) * scale
        scores = scores.reshape(b, kv, groups, rows, -1)
        scores = jnp.where(m_blk[:, None, None], scores, NEG_INF)
        # softmax with the normalisation applied to the output instead of the probabilities:
        # XLA:CPU otherwise materialises the divisor broadcast to the scores' shape
        # (single-threaded; fwd+bwd per layer ~6-9% faster, measured 2026-11-27)
        peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        e = jnp.exp(scores - peak)
        out = jnp.einsum("bkms,bksd->bkmd", e.reshape(b, kv, groups * rows, -1).astype(v.dtype),
                         v_blk).reshape(b, kv, groups, rows, d)
        return (out * (1.0 / jnp.sum(e, axis=-1))[..., None]).astype(v.dtype)

    if not causal_block or t <= causal_block:
        out = block(qg, kt, vt, mask)
    else:
        out = jnp.concatenate(
            [block(qg[:, :, :, s:s + causal_block], kt[:, :, :s + causal_block],
                   vt[:, :, :s + causal_block], mask[:, s:s + causal_block, :s + causal_block])
             for s in range(0, t, causal_block)], axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of a few new queries ``q [B, T, H, D]`` over a KV cache: keys ``k [B, KV, D,
    S]``, values ``v [B, KV, S, D]`` (``mask [B, T, S]``). Grouped form: the cache is read once,
    never repeated per head."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    if t == 1 and h // kv > 1:
        # One query per row (a decode step) with grouped heads: multiply-and-reduce reads the
        # cache once as a stream; XLA:CPU runs it ~1.7x faster than 2 * B * KV tiny [G, D] x
        # [D, S] matmuls. Without grouping (G = 1) the broadcast form is 14-25x slower than the
        # einsum below (measured: B=64, KV=4, S=256, D=32: 20 ms vs 1.4 ms per call).
        q1 = q.reshape(b, kv, h // kv, d, 1).astype(jnp.float32)
        scores = jnp.sum(q1 * k[:, :, None, :, :].astype(jnp.float32), axis=-2)  # [B,KV,G,S]
        scores = jnp.where(mask[:, :, None, :], scores * (d ** -0.5), NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.sum(probs[..., None] * v[:, :, None, :, :].astype(jnp.float32), axis=-2)
        return out.astype(q.dtype).reshape(b, 1, h, d)
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bkds->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores * (d ** -0.5), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, d)


def packed_mask(segment_ids: jax.Array, parent_ids: jax.Array | None = None) -> jax.Array:
    """``[B, L, L]``: query i sees key j iff j <= i, key j is not padding, and j is in i's
    segment -- or, with ``parent_ids [B, L]``, in the segment ``parent_ids[i]`` names (a shared
    prefix packed once before its children: see :mod:`mtrl_jax.training.packing`; 0 = none)."""
    length = segment_ids.shape[1]
    idx = jnp.arange(length)
    causal = idx[None, :, None] >= idx[None, None, :]
    visible = segment_ids[:, :, None] == segment_ids[:, None, :]
    if parent_ids is not None:
        visible = visible | (parent_ids[:, :, None] == segment_ids[:, None, :])
    return causal & visible & (segment_ids[:, None, :] > 0)


class PackedIds(NamedTuple):
    """What the layers get instead of a ``[B, L, L]`` mask under ``attention="pallas"``: the
    blockwise kernel computes the same mask from the ids, block by block."""

    segment_ids: jax.Array
    parent_ids: jax.Array | None


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        common = dict(cfg=cfg, lora_scale=lora.scale, lora_dtype=jnp.dtype(lora.param_dtype),
                      rngs=rngs)
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias,
                             lora_rank=lora.rank_for("q"), **common)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias,
                             lora_rank=lora.rank_for("k"), **common)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias,
                             lora_rank=lora.rank_for("v"), **common)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias,
                             lora_rank=lora.rank_for("o"), **common)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.jnp_param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def qkv(self, x, cos, sin, use_lora):
        b, t, _ = x.shape
        q = self.q_proj(x, use_lora).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, use_lora).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, use_lora).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, cos, sin, mask, use_lora: bool = True):
        q, k, v = self.qkv(x, cos, sin, use_lora)
        if isinstance(mask, PackedIds):  # ModelConfig.attention == "pallas"
            from mtrl_jax.models.flash_attention import flash_attention

            out = flash_attention(q, k, v, mask.segment_ids, mask.parent_ids)
        else:
            out = attend(q, k, v, mask, causal_block=ATTENTION_BLOCK)
        return self.o_proj(out.reshape(*x.shape[:2], -1), use_lora)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        common = dict(cfg=cfg, bias=cfg.mlp_bias, lora_scale=lora.scale,
                      lora_dtype=jnp.dtype(lora.param_dtype), rngs=rngs)
        self.gate_proj = Linear(h, i, lora_rank=lora.rank_for("gate"), **common)
        self.up_proj = Linear(h, i, lora_rank=lora.rank_for("up"), **common)
        self.down_proj = Linear(i, h, lora_rank=lora.rank_for("down"), **common)

    def __call__(self, x, use_lora: bool = True):
        return self.down_proj(jax.nn.silu(self.gate_proj(x, use_lora)) * self.up_proj(x, use_lora),
                              use_lora)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.self_attn = Attention(cfg, lora, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, lora, rngs)

    def __call__(self, x, cos, sin, mask, use_lora: bool = True):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, use_lora)
        return h + self.mlp(self.post_attention_layernorm(h), use_lora)

    def extend(self, x, cos, sin, mask, k_cache, v_cache, write_pos, use_lora: bool = True):
        """Like ``__call__`` but attends over the cache after writing this step's keys/values.

        ``k_cache [B, KV, D, S]``, ``v_cache [B, KV, S, D]``; ``write_pos [B, T]`` (``S`` =
        drop, for padding); ``mask [B, T, W]`` with ``W <= S``: attention reads only the first
        ``W`` cache slots (see :meth:`CausalLM.extend`'s ``window``).
        """
        attn = self.self_attn
        q, k, v = attn.qkv(self.input_layernorm(x), cos, sin, use_lora)
        b_idx = jnp.arange(x.shape[0])[:, None]
        # [B, T, KV, D] keys scattered to [B, :, :, write_pos], values to [B, :, write_pos, :]
        k_cache = k_cache.at[b_idx, :, :, write_pos].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[b_idx, :, write_pos].set(v.astype(v_cache.dtype), mode="drop")
        w = mask.shape[-1]
        out = attend_cache(q, k_cache[..., :w].astype(q.dtype),
                           v_cache[:, :, :w].astype(q.dtype), mask)
        h = x + attn.o_proj(out.reshape(*x.shape[:2], -1), use_lora)
        return h + self.mlp(self.post_attention_layernorm(h), use_lora), k_cache, v_cache

    def extend_t(self, xt, cos_t, sin_t, mask, k_cache, v_cache, write_pos, n_valid=None):
        """One new token per row, feature-major (see :meth:`CausalLM.decode_logits`):
        ``xt [hidden, B]``, ``cos_t, sin_t [head_dim // 2, B]``, ``mask [B, W]``, ``write_pos
        [B]`` (``S`` = drop). Kernels stored ``[out, in]``, adapters folded or off. With
        ``n_valid [B]`` (the number of slots each row attends) the cache write and the attention
        run in the CPU kernel (:func:`~mtrl_jax.models.cpu_kernels.decode_attention`) instead
        of a scatter and attention over ``mask``."""
        attn = self.self_attn
        b = xt.shape[1]
        h_kv, h_q, d = attn.num_kv_heads, attn.num_heads, attn.head_dim
        y = self.input_layernorm(xt, axis=0)
        q = attn.q_proj.apply_t(y).reshape(h_q, d, b)
        k = attn.k_proj.apply_t(y).reshape(h_kv, d, b)
        v = attn.v_proj.apply_t(y).reshape(h_kv, d, b)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q, axis=1), attn.k_norm(k, axis=1)
        q, k = apply_rope_t(q, cos_t, sin_t), apply_rope_t(k, cos_t, sin_t)
        if n_valid is not None:
            out_t, k_cache, v_cache = cpu_kernels.decode_attention(
                q, k, v, write_pos, n_valid, k_cache, v_cache)
            h = xt + attn.o_proj.apply_t(out_t.astype(q.dtype).reshape(h_q * d, b))
        else:
            b_idx = jnp.arange(b)
            # [KV, D, B] -> [B, KV, D] written at [b, :, :, write_pos[b]] / [b, :,
            # write_pos[b], :]
            k_cache = k_cache.at[b_idx, :, :, write_pos].set(
                jnp.transpose(k, (2, 0, 1)).astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[b_idx, :, write_pos].set(
                jnp.transpose(v, (2, 0, 1)).astype(v_cache.dtype), mode="drop")
            w = mask.shape[-1]
            q_rows = jnp.transpose(q, (2, 0, 1))[:, None]  # [B, 1, H, D]
            out = attend_cache(q_rows, k_cache[..., :w].astype(q.dtype),
                               v_cache[:, :, :w].astype(q.dtype), mask[:, None, :])
            h = xt + attn.o_proj.apply_t(out.reshape(b, h_q * d).T)
        mlp = self.mlp
        y = self.post_attention_layernorm(h, axis=0)
        h = h + mlp.down_proj.apply_t(jax.nn.silu(mlp.gate_proj.apply_t(y))
                                      * mlp.up_proj.apply_t(y))
        return h, k_cache, v_cache


def _cache_slots(cache: KVCache, num_new: jax.Array, t: int, window: int | None):
    """For ``t`` new tokens per row (the first ``num_new [B]`` real) after the cache's contents:
    their positions ``[B, t]``, the slots they are written to ``[B, t]`` (``S`` = drop: padding
    or past the cache) and the attention mask over the first ``window`` slots ``[B, t, W]``."""
    s = cache.max_len
    w = s if window is None else min(int(window), s)
    offs = jnp.arange(t)[None, :]
    positions = cache.lengths[:, None] + offs
    real = offs < num_new[:, None]
    write_pos = jnp.where(real & (positions < s), positions, s)
    mask = jnp.arange(w)[None, None, :] <= positions[:, :, None]
    return positions, write_pos, mask


class CausalLM(nnx.Module):
    """The decoder with its embedding and LM head.

    Args:
      cfg: :class:`~mtrl_jax.models.config.ModelConfig`.
      lora: :class:`~mtrl_jax.models.lora.LoRAConfig` (``rank=0`` for none).
      rngs: ``nnx.Rngs`` for the random initialisation (overwritten by a checkpoint load).
    """

    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None = None, *, rngs: nnx.Rngs):
        lora = lora or LoRAConfig(rank=0)
        self.cfg = cfg
        self.lora_config = lora
        pdt = cfg.jnp_param_dtype
        self.embed_tokens = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))).astype(pdt)
        )
        self.layers = nnx.List([DecoderLayer(cfg, lora, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(
                (0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size))
                 ).astype(pdt)
            )
        #: ``True`` once :func:`prepare_decode_weights` stored ``lm_head`` as ``[vocab, hidden]``.
        self.head_transposed = False
        #: ``True`` once :func:`prepare_decode_weights` transposed every kernel: decode steps
        #: then run feature-major (see :meth:`decode_logits`).
        self.feature_major_decode = False
        #: ``True`` once :func:`prepare_decode_weights` enabled the CPU decode-attention kernel
        #: for the feature-major decode steps.
        self.decode_attention_kernel = False
        inv_freq, scale = rope_frequencies(cfg)
        self._inv_freq = tuple(float(x) for x in inv_freq)
        self._rope_scale = scale

    # ------------------------------------------------------------------ pieces

    def lm_head_kernel(self) -> jax.Array:
        """``[hidden, vocab]`` (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        return self.lm_head[...].T if self.head_transposed else self.lm_head[...]

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.cfg.jnp_dtype)

    def rope(self, positions: jax.Array):
        import numpy as np

        return rope_angles(positions, np.asarray(self._inv_freq, np.float32), self._rope_scale)

    # ------------------------------------------------------------------ packed forward

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, *, use_lora: bool = True,
                      remat: bool = False, parent_ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states ``[B, L, hidden]`` of packed rows.

        Args:
          tokens: ``[B, L] int``.
          positions: ``[B, L] int`` position of each token within its segment (default
            ``0..L-1``, i.e. one segment per row).
          segment_ids: ``[B, L] int``, 0 = padding (default: all ones).
          use_lora: ``False`` switches the adapters off (reference policy).
          remat: recompute each layer's activations in the backward pass (saves memory).
          parent_ids: ``[B, L] int`` (optional): each token also sees the earlier tokens of the
            segment it names (a prefix shared by several segments; 0 = none).
        """
        if tokens.ndim != 2:
            raise ValueError(f"'tokens' must be [B, L], got shape {tokens.shape}")
        b, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        if segment_ids is None:
            segment_ids = jnp.ones((b, length), jnp.int32)
        for name, arr in (("positions", positions), ("segment_ids", segment_ids),
                          ("parent_ids", parent_ids)):
            if arr is not None and arr.shape != tokens.shape:
                raise ValueError(f"'{name}' has shape {arr.shape} but 'tokens' has shape "
                                 f"{tokens.shape}")
        x = self.embed(tokens)
        cos, sin = self.rope(positions)
        if self.cfg.attention == "pallas":
            mask = PackedIds(segment_ids, parent_ids)
        else:
            mask = packed_mask(segment_ids, parent_ids)
        if remat:
            x = self._remat_layers(x, cos, sin, mask, use_lora)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, mask, use_lora)
        return self.norm(x)

    def _remat_layers(self, x, cos, sin, mask, use_lora):
        """The layers under ``jax.checkpoint``, as a ``lax.scan`` over their stacked weights.

        A Python loop of checkpointed layers does not bound memory on XLA:CPU: its scheduler
        runs every layer's recomputation early, so each layer's attention probabilities stay
        live (measured: 0.55 GiB per SmolLM2 layer on 5 rows of 1,280 tokens, with or without
        checkpointing). Inside a scan the backward recomputes one layer at a time. Layers
        with different structures (none of the supported layouts) keep the loop."""
        splits = [nnx.split(layer) for layer in self.layers]
        graphdef = splits[0][0]

        def run(state, x):
            return nnx.merge(graphdef, state)(x, cos, sin, mask, use_lora)

        if any(gd != graphdef for gd, _ in splits[1:]):
            for gd, state in splits:
                x = jax.checkpoint(lambda st, x, gd=gd: nnx.merge(gd, st)(
                    x, cos, sin, mask, use_lora))(state, x)
            return x
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[st for _, st in splits])
        x, _ = jax.lax.scan(lambda x, st: (jax.checkpoint(run)(st, x), None), x, stacked)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., H] -> [..., V]`` float32 logits (full vocabulary: small inputs only;
        use :func:`mtrl_jax.models.logprobs.token_logprobs` for training batches)."""
        if self.lm_head is None or self.head_transposed:  # [vocab, hidden]: see _matmul_nt
            w_t = (self.embed_tokens if self.lm_head is None else self.lm_head)[...]
            return _matmul_nt(hidden, w_t.astype(self.cfg.jnp_dtype), jnp.float32)
        w = self.lm_head_kernel().astype(self.cfg.jnp_dtype)
        return jnp.einsum("...h,hv->...v", hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None, *, use_lora: bool = True):
        """Full logits ``[B, L, V] f32`` (tests and small inputs)."""
        return self.logits(self.hidden_states(tokens, positions, segment_ids, use_lora=use_lora))

    # ------------------------------------------------------------------ cached forward

    def extend(self, cache: KVCache, tokens: jax.Array, num_new: jax.Array, *,
               use_lora: bool = True, window: int | None = None) -> tuple[jax.Array, KVCache]:
        """Append ``tokens [B, T]`` (the first ``num_new [B]`` of each row are real) to the cache.

        Returns the final-normed hidden states ``[B, T, H]`` of the new tokens and the updated
        cache (``lengths += num_new``). New tokens get positions ``lengths[b] + t``; tokens that
        would not fit in the cache are dropped (the caller sizes the cache; the sampler checks).

        ``window`` (static): attend over the first ``window`` cache slots only, so that a step's
        attention reads what the cache holds rather than its whole length. The caller ensures
        every real new token's position is ``< window`` (the outputs of rows where it is not are
        wrong; their cache writes are still right).
        """
        s = cache.max_len
        positions, write_pos, mask = _cache_slots(cache, num_new, tokens.shape[1], window)
        x = self.embed(tokens)
        cos, sin = self.rope(positions)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k_i, v_i = layer.extend(x, cos, sin, mask, cache.k[i], cache.v[i], write_pos,
                                       use_lora)
            ks.append(k_i)
            vs.append(v_i)
        new_cache = KVCache(tuple(ks), tuple(vs),
                            jnp.minimum(cache.lengths + num_new.astype(jnp.int32), s))
        return self.norm(x), new_cache

    def decode_logits(self, cache: KVCache, tokens: jax.Array, feed: jax.Array, *,
                      use_lora: bool = True, window: int | None = None
                      ) -> tuple[jax.Array, KVCache]:
        """One decode step: append ``tokens [B]`` (rows with ``feed [B] == 0`` write nothing)
        and return the next-token logits ``[B, vocab] f32`` with the updated cache.

        Equals ``extend(cache, tokens[:, None], feed)`` followed by :meth:`logits`. Once
        :func:`prepare_decode_weights` transposed the kernels (CPU) and with the adapters off
        or folded, the step runs *feature-major*: activations ``[features, B]`` and each
        matmul ``W^T x^T`` with the weight as the left operand. At the few dozen rows of a
        decode step XLA:CPU runs those matmuls ~25% faster than ``x W`` over the same
        ``[out, in]`` weights (experiments/LOG.md, 2026-11-27, third session).
        """
        if not self.feature_major_decode or use_lora:
            hidden, cache = self.extend(cache, tokens[:, None], feed, use_lora=use_lora,
                                        window=window)
            return self.logits(hidden[:, 0]), cache
        s = cache.max_len
        positions, write_pos, mask = _cache_slots(cache, feed, 1, window)
        pos, write_pos, mask = positions[:, 0], write_pos[:, 0], mask[:, 0]
        xt = self.embed(tokens).T
        cos, sin = self.rope(pos)
        cos_t, sin_t = cos.T, sin.T
        # the kernel reads each row's slots 0 .. pos (the mask's keys when pos < window)
        kernel = self.decode_attention_kernel and cache.k[0].dtype == jnp.float32
        n_valid = jnp.minimum(pos + 1, s) if kernel else None
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            xt, k_i, v_i = layer.extend_t(xt, cos_t, sin_t, mask, cache.k[i], cache.v[i],
                                          write_pos, n_valid)
            ks.append(k_i)
            vs.append(v_i)
        ht = self.norm(xt, axis=0)
        w_t = (self.embed_tokens if self.lm_head is None else self.lm_head)[...]  # [V, hidden]
        logits_t = jnp.matmul(w_t.astype(self.cfg.jnp_dtype), ht,
                              preferred_element_type=jnp.float32)
        # the barrier keeps XLA from folding the transpose below into the dot (which would make
        # the activations the left operand again)
        logits_t = jax.lax.optimization_barrier(logits_t)
        new_cache = KVCache(tuple(ks), tuple(vs),
                            jnp.minimum(cache.lengths + feed.astype(jnp.int32), s))
        return logits_t.T, new_cache
