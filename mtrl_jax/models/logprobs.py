"""Per-token log-probs of packed rows, chunked so the ``[tokens, vocab]`` softmax never exists
whole.

Alignment: ``logprobs[b, t] = log p(tokens[b, t] | tokens of the same segment before t)``, i.e.
the log-prob of a token sits at the token's own position (the same place as its ``loss_mask``
bit). It is computed from the hidden state at ``t - 1``; the first token of every segment and
padding get 0.

Memory: when the full ``[tokens, vocab]`` f32 logits would exceed :data:`LOGITS_MEMORY_BUDGET`
(or a ``chunk_size`` is given), the LM head runs over ``chunk_size`` tokens at a time inside a
rematerialised scan, so the peak extra memory is ``chunk_size x vocab`` floats (forward and
backward), not ``tokens x vocab``. Below the budget it runs in one piece and keeps its logits for
the backward pass (no recomputation: about 4% faster on the peers' train step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtrl_jax.models.transformer import CausalLM


class TokenStats(NamedTuple):
    logprobs: jax.Array  # [B, L] f32
    entropy: jax.Array | None  # [B, L] f32 (entropy of the predictive distribution) or None


def previous_token_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, L] bool``: token t has a predecessor in its own segment."""
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return (segment_ids > 0) & (prev == segment_ids)


#: Full-vocabulary logits up to this size are computed in one piece (no chunking, no
#: recomputation in the backward pass); above it, :func:`head_logprobs` chunks and remats.
LOGITS_MEMORY_BUDGET = 1 << 30
DEFAULT_CHUNK = 1024


def head_logprobs(hidden: jax.Array, targets: jax.Array, lm_head: jax.Array, *,
                  chunk_size: int | None = None, temperature: float = 1.0,
                  with_entropy: bool = False, compute_dtype=jnp.float32) -> TokenStats:
    """``log softmax(hidden @ lm_head / temperature)[targets]`` over ``[N, H]`` rows, chunked.

    Args:
      hidden: ``[N, H]``; targets: ``[N] int``; lm_head: ``[H, V]``.
      chunk_size: rows per chunk (``N`` is padded up to a multiple). ``None``: one piece when
        the f32 logits fit in :data:`LOGITS_MEMORY_BUDGET`, else chunks of
        :data:`DEFAULT_CHUNK`. With more than one chunk each chunk's logits are recomputed in
        the backward pass, so memory grows with the chunk, not with ``N x V``.
      temperature: sampling temperature the log-probs refer to.
      with_entropy: also return the entropy of each row's distribution.
    """
    n, h = hidden.shape
    vocab = lm_head.shape[1]
    if chunk_size is None:
        chunk_size = n if n * vocab * 4 <= LOGITS_MEMORY_BUDGET else DEFAULT_CHUNK
    chunk = max(1, min(chunk_size, n))
    pad = (-n) % chunk
    hid = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, h)
    tgt = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    w = lm_head.astype(compute_dtype)
    inv_t = 1.0 / temperature

    def one_chunk(hc, tc):
        logits = jnp.einsum("nh,hv->nv", hc.astype(compute_dtype), w,
                            preferred_element_type=jnp.float32) * inv_t
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        ent = None
        if with_entropy:
            probs = jnp.exp(logits - lse[:, None])
            ent = lse - jnp.sum(probs * logits, axis=-1)
        return picked - lse, ent

    if hid.shape[0] == 1:
        lp, ent = one_chunk(hid[0], tgt[0])
        return TokenStats(lp[:n], ent[:n] if with_entropy else None)
    remat_chunk = jax.checkpoint(one_chunk)
    _, (lp, ent) = jax.lax.scan(lambda c, xs: (c, remat_chunk(*xs)), None, (hid, tgt))
    lp = lp.reshape(-1)[:n]
    ent = ent.reshape(-1)[:n] if with_entropy else None
    return TokenStats(lp, ent)


def token_logprobs(model: CausalLM, tokens: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array, *, use_lora: bool = True,
                   chunk_size: int | None = None,
                   temperature: float = 1.0, remat: bool = False,
                   with_entropy: bool = False,
                   parent_ids: jax.Array | None = None) -> TokenStats:
    """Log-probs (and optionally entropies) of every token of packed rows ``[B, L]``.

    See the module docstring for the alignment. ``use_lora=False`` gives the reference policy
    (adapters off) from the same weights. ``parent_ids``: shared prefixes
    (:meth:`~mtrl_jax.models.transformer.CausalLM.hidden_states`); a segment's first token gets
    no log-prob even when it continues its parent (the packer keeps every loss token's
    predecessor in the loss token's own segment).
    """
    hidden = model.hidden_states(tokens, positions, segment_ids, use_lora=use_lora, remat=remat,
                                 parent_ids=parent_ids)
    b, length, h = hidden.shape
    # hidden at t-1 predicts token t
    prev_hidden = jnp.pad(hidden[:, :-1], ((0, 0), (1, 0), (0, 0)))
    stats = head_logprobs(prev_hidden.reshape(b * length, h), tokens.reshape(-1),
                          model.lm_head_kernel(), chunk_size=chunk_size,
                          temperature=temperature, with_entropy=with_entropy,
                          compute_dtype=model.cfg.jnp_dtype)
    valid = previous_token_mask(segment_ids)
    lp = jnp.where(valid, stats.logprobs.reshape(b, length), 0.0)
    ent = None
    if with_entropy:
        ent = jnp.where(valid, stats.entropy.reshape(b, length), 0.0)
    return TokenStats(lp, ent)
