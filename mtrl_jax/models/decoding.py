"""Batched KV-cache decoding: prefill, sampling, and continuing a conversation.

A :class:`~mtrl_jax.models.transformer.KVCache` holds a prefix of each sequence. ``generate``
first *extends* the cache with the new input tokens of each row (a prompt, or the tool results
appended for the next turn -- whatever the cache does not hold yet), then samples up to
``max_new_tokens`` tokens per row in a ``lax.while_loop``, one cached step each. Nothing already
in the cache is re-encoded.

Shapes are static per (batch, input bucket, cache size, max_new_tokens): the sampler pads inputs
to a few buckets (:func:`bucket_length`) so a run compiles a handful of programs, not one per turn.

Log-probs returned are ``log softmax(logits / temperature)`` of the sampled tokens -- the
distribution the trainer recomputes -- before top-k/top-p truncation (with truncation on, the
true behaviour probability of a kept token is higher by the kept mass; see the TIS correction
in :mod:`mtrl_jax.kernels.losses`). With ``temperature == 0`` decoding is greedy and the
log-probs are those of the untempered distribution.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtrl_jax.models.transformer import CausalLM, KVCache, init_cache, prepare_decode_weights


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature (0 = greedy), top_p (1 = off), top_k (0 = off), max_tokens per turn and the
    stop token ids (the stop token is kept in the output)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_tokens >= 1")


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, max_new] int32 (0 after the end)
    logprobs: jax.Array  # [B, max_new] f32 (0 after the end)
    num_tokens: jax.Array  # [B] int32 generated tokens per row
    stopped: jax.Array  # [B] bool: ended on a stop token (else: budget or cache full)
    cache: KVCache  # holds inputs + generated tokens except each row's last sampled token


def bucket_length(n: int, minimum: int = 16) -> int:
    """The input bucket for ``n`` tokens: the next power of two, at least ``minimum``."""
    b = minimum
    while b < n:
        b *= 2
    return b


def sample_from_logits(logits: jax.Array, key: jax.Array, params: SamplingParams,
                       row_keys: jax.Array | None = None, seeded: jax.Array | None = None,
                       index: jax.Array | int = 0):
    """Sample one token per row of ``logits [B, V] f32``; returns ``(tokens, logprobs)``.

    The draw of each row comes from ``key``, except rows with ``seeded[b]``, whose draw comes
    from ``fold_in(row_keys[b], index)`` alone (``index``: the token's position in its request):
    their samples do not depend on which other rows share the call (per-request seeds)."""
    if params.temperature == 0.0:
        tok = jnp.argmax(logits, axis=-1)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return tok.astype(jnp.int32), jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
    scaled = logits / params.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    masked = scaled
    if params.top_k > 0:
        kth = jax.lax.top_k(scaled, params.top_k)[0][:, -1:]
        masked = jnp.where(scaled < kth, -jnp.inf, masked)
    if params.top_p < 1.0:
        sorted_logits = jnp.sort(masked, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cum - probs) < params.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        masked = jnp.where(masked < threshold, -jnp.inf, masked)
    u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32)
    if row_keys is not None:
        own = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, index), (),
                                                    jnp.float32))(row_keys)
        u = jnp.where(seeded[:, None], own[:, None], u)
    tok = _inverse_cdf_sample(masked, u)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


#: Vocabulary block of the two-level inverse-CDF draw (see :func:`_inverse_cdf_sample`).
SAMPLE_BLOCK = 128


def _inverse_cdf_sample(logits: jax.Array, u01: jax.Array) -> jax.Array:
    """One draw per row from ``softmax(logits)`` by inverting the CDF with a single uniform
    (``u01 [B, 1]`` in [0, 1)).

    Needs one random number per row instead of one per vocabulary entry (Gumbel-max), which on
    CPU is most of a decode step's sampling time. The CDF is inverted in two levels -- first
    over the masses of blocks of :data:`SAMPLE_BLOCK` tokens, then inside the chosen block --
    so the cumulative sums run over ~vocab/128 and 128 entries instead of the whole vocabulary
    (a [32, 8192] cumsum was ~1 ms of a ~30 ms decode step on CPU). f32 rounding distorts
    probabilities by about 1e-7 relative; tokens with zero probability are never drawn.
    """
    b, vocab = logits.shape
    probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    c = min(SAMPLE_BLOCK, vocab)
    nb = -(-vocab // c)
    probs = jnp.pad(probs, ((0, 0), (0, nb * c - vocab))).reshape(b, nb, c)
    mass = jnp.sum(probs, axis=-1)  # [B, nb]
    cdf = jnp.cumsum(mass, axis=-1)
    u = u01 * cdf[:, -1:]
    # the block: never past the last one with mass (rounding at the top end)
    last_block = nb - 1 - jnp.argmax(jnp.flip(mass > 0, axis=-1), axis=-1)
    blk = jnp.minimum(jnp.sum(cdf <= u, axis=-1), last_block)
    rows = jnp.arange(b)
    u_in = u[:, 0] - (cdf[rows, blk] - mass[rows, blk])
    inner = probs[rows, blk]  # [B, c]
    j = jnp.sum(jnp.cumsum(inner, axis=-1) <= u_in[:, None], axis=-1)
    last_in = c - 1 - jnp.argmax(jnp.flip(inner > 0, axis=-1), axis=-1)
    return (blk * c + jnp.minimum(j, last_in)).astype(jnp.int32)


#: Smallest attention window of the decode loop (see :func:`decode_windows`).
MIN_DECODE_WINDOW = 256


def decode_windows(max_len: int, min_window: int | None = MIN_DECODE_WINDOW) -> list[int]:
    """The attention windows the decode loop goes through for a cache of ``max_len`` slots:
    ``min_window, 2 * min_window, ...`` below ``max_len``, then ``max_len`` itself.

    A decode step's attention reads the whole window, so a loop that always attended over the
    cache's full length would read a 4,096-slot cache for a 300-token episode. Instead the loop
    runs in phases: while every live row's next position is inside a window, steps attend over
    that window only; then the next, twice as long. The input tokens fed before the loop (a
    prompt, or the next turn's tool results) attend over the smallest window that holds them.
    Each window is a separate loop body and prefill branch in the compiled program (compile
    time grows with their number; ``None`` or a ``min_window >= max_len`` gives one window, the
    whole cache). Results equal the one-window program's up to f32 summation order.
    """
    if min_window is None or min_window <= 0:
        return [max_len]
    out, w = [], int(min_window)
    while w < max_len:
        out.append(w)
        w *= 2
    return out + [max_len]


def _last_hidden(hidden: jax.Array, num_new: jax.Array) -> jax.Array:
    idx = jnp.maximum(num_new - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


#: Input tokens encoded per chunk when a call feeds more (see :func:`extend_chunked`).
PREFILL_CHUNK = 512


def extend_chunked(model: CausalLM, cache: KVCache, inputs: jax.Array, num_inputs: jax.Array,
                   *, use_lora: bool, window: int | None = None,
                   chunk: int | None = PREFILL_CHUNK) -> tuple[jax.Array, KVCache]:
    """``model.extend`` of ``inputs [B, T]`` in chunks of ``chunk`` tokens (a ``lax.scan``:
    one copy of the layers in the program); returns the hidden state of each row's last real
    input token ``[B, H]`` and the cache. Encoding a 4,096-token prompt at once materialises
    attention scores ``[B, heads, T, window]`` per layer (16 rows x 9 heads x 4,096^2 in f32:
    9.7 GB; an SOP-Bench evaluation of SmolLM2 was OOM-killed at 21.7 GB); a chunk's are
    ``T / chunk`` times smaller. Equal to one call up to f32 summation order."""
    b, t = inputs.shape
    if chunk is None or t <= chunk:
        hidden, cache = model.extend(cache, inputs, num_inputs, use_lora=use_lora, window=window)
        return _last_hidden(hidden, num_inputs), cache
    n_chunks = -(-t // chunk)
    padded = jnp.pad(inputs, ((0, 0), (0, n_chunks * chunk - t)))
    xs = (padded.reshape(b, n_chunks, chunk).transpose(1, 0, 2),
          jnp.arange(n_chunks, dtype=jnp.int32) * chunk)

    def body(carry, x):
        cache, last = carry
        toks, start = x
        n = jnp.clip(num_inputs - start, 0, chunk)
        hidden, cache = model.extend(cache, toks, n, use_lora=use_lora, window=window)
        last = jnp.where((n > 0)[:, None], _last_hidden(hidden, n).astype(last.dtype), last)
        return (cache, last), None

    last0 = jnp.zeros((b, model.cfg.hidden_size), model.cfg.jnp_dtype)
    (cache, last), _ = jax.lax.scan(body, (cache, last0), xs)
    return last, cache


def _generate(model: CausalLM, cache: KVCache, inputs: jax.Array, num_inputs: jax.Array,
              key: jax.Array, max_new: jax.Array, params: SamplingParams, max_new_tokens: int,
              use_lora: bool, min_window: int | None = None,
              prefill_chunk: int | None = PREFILL_CHUNK, row_keys: jax.Array | None = None,
              seeded: jax.Array | None = None) -> GenerateOutput:
    b = inputs.shape[0]
    windows = decode_windows(cache.max_len, min_window)

    def prefill(cache, window):
        return extend_chunked(model, cache, inputs, num_inputs, use_lora=use_lora,
                              window=window, chunk=prefill_chunk)

    if len(windows) == 1:
        hidden, cache = prefill(cache, None)
    else:
        # the input tokens attend over the smallest window that holds them all (one branch per
        # window; the chosen one runs)
        need = jnp.max(cache.lengths + num_inputs)
        pick = jnp.sum(need > jnp.asarray(windows[:-1], jnp.int32))
        hidden, cache = jax.lax.switch(
            pick, [functools.partial(prefill, window=None if w == cache.max_len else w)
                   for w in windows], cache)
    logits = model.logits(hidden)
    key, sub = jax.random.split(key)
    tok, lp = sample_from_logits(logits, sub, params, row_keys, seeded, 0)
    stop_ids = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
    active = max_new > 0

    out_tok = jnp.zeros((b, max_new_tokens), jnp.int32)
    out_lp = jnp.zeros((b, max_new_tokens), jnp.float32)
    out_tok = out_tok.at[:, 0].set(jnp.where(active, tok, 0))
    out_lp = out_lp.at[:, 0].set(jnp.where(active, lp, 0.0))
    count = active.astype(jnp.int32)
    stopped = active & jnp.isin(tok, stop_ids)
    done = ~active | stopped | (count >= max_new) | (cache.lengths >= cache.max_len)

    def body(carry, window):
        step, cache, last, done, count, stopped, out_tok, out_lp, key = carry
        feed = (~done).astype(jnp.int32)
        logits, cache = model.decode_logits(cache, last, feed, use_lora=use_lora,
                                            window=window)
        key, sub = jax.random.split(key)
        tok, lp = sample_from_logits(logits, sub, params, row_keys, seeded, step)
        live = ~done
        out_tok = out_tok.at[:, step].set(jnp.where(live, tok, 0))
        out_lp = out_lp.at[:, step].set(jnp.where(live, lp, 0.0))
        count = count + live.astype(jnp.int32)
        hit = live & jnp.isin(tok, stop_ids)
        stopped = stopped | hit
        last = jnp.where(live, tok, last)
        done = done | hit | (count >= max_new) | (cache.lengths >= cache.max_len)
        return step + 1, cache, last, done, count, stopped, out_tok, out_lp, key

    def cond(carry, window):
        step, cache, _, done, *_ = carry
        go = (step < max_new_tokens) & ~jnp.all(done)
        if window is not None:  # a live row writes at position lengths: it must be < window
            go = go & jnp.all(done | (cache.lengths < window))
        return go

    carry = (jnp.int32(1), cache, tok, done, count, stopped, out_tok, out_lp, key)
    if model.decode_attention_kernel:
        # the kernel reads each row's own slots whatever the window: one loop body
        windows = [cache.max_len]
    for w in windows:
        window = None if w == cache.max_len else w
        carry = jax.lax.while_loop(functools.partial(cond, window=window),
                                   functools.partial(body, window=window), carry)
    _, cache, _, _, count, stopped, out_tok, out_lp, _ = carry
    return GenerateOutput(out_tok, out_lp, count, stopped, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "max_new_tokens", "use_lora",
                                             "fold", "min_window", "attention_kernel",
                                             "prefill_chunk"),
                   donate_argnames=("cache",))
def _generate_jit(graphdef, state, cache, inputs, num_inputs, key, max_new, params,
                  max_new_tokens, use_lora, fold, min_window=MIN_DECODE_WINDOW,
                  attention_kernel=True, prefill_chunk=PREFILL_CHUNK, row_keys=None,
                  seeded=None):
    model = nnx.merge(graphdef, state)
    transpose = jax.default_backend() == "cpu"
    if (use_lora and fold) or (transpose and not use_lora):
        prepare_decode_weights(model, fold=use_lora, transpose=transpose,
                               attention_kernel=attention_kernel)
        use_lora = False
    return _generate(model, cache, inputs, num_inputs, key, max_new, params, max_new_tokens,
                     use_lora, min_window, prefill_chunk, row_keys, seeded)


def generate(model: CausalLM, cache: KVCache, inputs: jax.Array, num_inputs: jax.Array,
             key: jax.Array, params: SamplingParams, *, max_new: jax.Array | None = None,
             max_new_tokens: int | None = None, use_lora: bool = True,
             fold_lora_weights: bool = True,
             min_window: int | None = MIN_DECODE_WINDOW,
             attention_kernel: bool = True,
             prefill_chunk: int | None = PREFILL_CHUNK,
             row_seeds: Sequence[int | None] | None = None) -> GenerateOutput:
    """Feed ``inputs [B, T]`` (first ``num_inputs [B]`` real, each ``>= 1``) after the cache's
    contents, then sample.

    Args:
      model: the policy; cache: its KV cache (donated: use the returned one).
      key: PRNG key.
      params: :class:`SamplingParams` (static: one compilation per distinct value).
      max_new: optional per-row budget ``[B]`` (``<= max_new_tokens``; 0 = skip the row).
      max_new_tokens: static loop bound (default ``params.max_tokens``).
      use_lora: sample from the policy with (default) or without its adapters.
      fold_lora_weights: fold the adapters into a temporary copy of the adapted kernels for the
        call (one extra copy of those weights in memory; decode steps ~2x faster on CPU; on CPU
        the copy is also transposed, see
        :func:`~mtrl_jax.models.transformer.prepare_decode_weights`). The log-probs
        then differ from the unfolded forward by f32 rounding only.
      min_window: the decode loop's smallest attention window (:func:`decode_windows`;
        ``None``: every step attends over the whole cache).
      attention_kernel: on CPU with folded or no adapters and an f32 cache, run the decode
        steps' attention in the C++ kernel of :mod:`mtrl_jax.models.cpu_kernels` (built on
        first use; both cores, each row's own slots; one loop body whatever ``min_window``).
        ``False``, or no C++ compiler: XLA's formulation. Equal up to f32 summation order.
      prefill_chunk: input tokens encoded per chunk when more are fed
        (:func:`extend_chunked`; ``None``: all at once).
      row_seeds: optional per-row seeds (``None`` entries: the row draws from ``key``): a
        seeded row's ``j``-th sampled token uses ``fold_in(key(seed), j)``, so its samples
        depend on its seed, inputs and weights only, not on the call's key or other rows
        (vLLM's per-request ``seed``). Rows without a seed draw exactly as without it.

    Rows generate until a stop token, their budget, or a full cache. The returned cache holds
    everything but each row's last sampled token, which the next call's ``inputs`` must begin
    with (the agent loop feeds "episode tokens not yet in the cache").
    """
    max_new_tokens = max_new_tokens or params.max_tokens
    b = inputs.shape[0]
    if cache.batch_size != b:
        raise ValueError(f"cache holds {cache.batch_size} rows but 'inputs' has {b}")
    if max_new is None:
        max_new = jnp.full((b,), max_new_tokens, jnp.int32)
    row_keys = seeded = None
    if row_seeds is not None and any(x is not None for x in row_seeds):
        if len(row_seeds) != b:
            raise ValueError(f"row_seeds has {len(row_seeds)} entries for {b} rows")
        seeds = np.asarray([0 if x is None else int(x) & 0xFFFFFFFF for x in row_seeds],
                           np.uint32)
        row_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        seeded = jnp.asarray([x is not None for x in row_seeds])
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, cache, jnp.asarray(inputs, jnp.int32),
                         jnp.asarray(num_inputs, jnp.int32), key,
                         jnp.minimum(jnp.asarray(max_new, jnp.int32), max_new_tokens),
                         params, max_new_tokens, use_lora, fold_lora_weights, min_window,
                         attention_kernel, prefill_chunk, row_keys, seeded)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "fold", "attention_kernel"),
                   donate_argnames=("cache",))
def _prefill_shared_jit(graphdef, state, cache, prefixes, prefix_len, src, take, use_lora, fold,
                        attention_kernel=True):
    model = nnx.merge(graphdef, state)
    transpose = jax.default_backend() == "cpu"
    if (use_lora and fold) or (transpose and not use_lora):  # the weights generate() runs with
        prepare_decode_weights(model, fold=use_lora, transpose=transpose,
                               attention_kernel=attention_kernel)
        use_lora = False
    u, p = prefixes.shape
    small = init_cache(model.cfg, u, p, dtype=cache.k[0].dtype)
    _, small = extend_chunked(model, small, prefixes, prefix_len, use_lora=use_lora)
    pick = take[:, None, None, None]
    ks = tuple(big.at[..., :p].set(jnp.where(pick, sk[src], big[..., :p]))
               for big, sk in zip(cache.k, small.k, strict=True))
    vs = tuple(big.at[:, :, :p].set(jnp.where(pick, sv[src], big[:, :, :p]))
               for big, sv in zip(cache.v, small.v, strict=True))
    return KVCache(ks, vs, jnp.where(take, prefix_len[src], cache.lengths))


def prefill_shared(model: CausalLM, cache: KVCache, prefixes: jax.Array, prefix_len: jax.Array,
                   src: jax.Array, take: jax.Array, *, use_lora: bool = True,
                   fold_lora_weights: bool = True, attention_kernel: bool = True) -> KVCache:
    """Encode each of ``prefixes [U, P]`` (the first ``prefix_len [U]`` tokens real) once and
    copy its keys and values into every cache row ``b`` with ``take[b]``, from prefix
    ``src[b]``; those rows must be empty (length 0) and then hold the prefix. Other rows are
    unchanged. The weights are prepared as :func:`generate` prepares them, so a row continued
    by ``generate`` samples what it would after encoding the prefix itself (up to f32 summation
    order). The cache is donated."""
    if prefixes.shape[1] > cache.max_len:
        raise ValueError(f"prefixes of {prefixes.shape[1]} tokens exceed the cache "
                         f"({cache.max_len})")
    graphdef, state = nnx.split(model)
    return _prefill_shared_jit(graphdef, state, cache, jnp.asarray(prefixes, jnp.int32),
                               jnp.asarray(prefix_len, jnp.int32), jnp.asarray(src, jnp.int32),
                               jnp.asarray(take, bool), use_lora, fold_lora_weights,
                               attention_kernel)
