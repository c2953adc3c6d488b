"""The NNX decoder without torch: log-probs, packing, LoRA, cache decoding, checkpoints."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtrl_jax.models import (
    CausalLM,
    LoRAConfig,
    ModelConfig,
    init_cache,
    load_model,
    merge_lora,
    save_model,
    split_lora,
)
from mtrl_jax.models.cpu_kernels import find_compiler
from mtrl_jax.models.decoding import (
    SamplingParams,
    _generate_jit,
    bucket_length,
    decode_windows,
    generate,
)
from mtrl_jax.models.logprobs import head_logprobs, token_logprobs
from mtrl_jax.models.transformer import attend, packed_mask, prepare_decode_weights
from mtrl_jax.training.lora_step import make_lora_train_step
from tests.model_helpers import LAYOUTS, full_logprobs, perturbed_model
from tests.packed_data import pack, scatter

LORA = LoRAConfig(rank=4, alpha=8.0)
HAVE_CXX = find_compiler() is not None  # the CPU decode-attention kernel builds


# llama's variant is the slowest (75 s in CI); it runs with `-m slow` (the llama layout's logits
# stay covered by tests/test_models_torch.py and tests/test_gguf.py in the default run)
@pytest.mark.parametrize("layout", [pytest.param("llama", marks=pytest.mark.slow), "qwen2",
                                    "qwen3"])
def test_chunked_logprobs_match_full_softmax(layout):
    model = perturbed_model(LAYOUTS[layout], LORA)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 101, (2, 13)))
    # jitted (one compile per program, not one per op: ~20 s less per case)
    want = jax.jit(lambda st, t: full_logprobs(nnx.merge(graphdef, st), t))(state, tokens)
    pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
    seg = jnp.ones((2, 13), jnp.int32)

    @functools.partial(jax.jit, static_argnames="chunk")
    def chunked(st, chunk):
        return token_logprobs(nnx.merge(graphdef, st), tokens, pos, seg, chunk_size=chunk,
                              with_entropy=True)

    for chunk in (1, 5, 26, 1000):
        got = chunked(state, chunk)
        np.testing.assert_allclose(got.logprobs, want, atol=2e-5)
    logits = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens)
    p = jax.nn.softmax(logits[:, :-1], -1)
    ent = -jnp.sum(p * jax.nn.log_softmax(logits[:, :-1], -1), -1)
    np.testing.assert_allclose(got.entropy[:, 1:], ent, atol=2e-5)
    assert np.all(np.asarray(got.logprobs[:, 0]) == 0.0)


def test_logprob_chunks_bound_memory():
    """The compiled log-prob program's temporaries grow with the chunk, not with tokens x vocab."""
    n, h, v = 2048, 32, 4096
    hid = jnp.zeros((n, h))
    tgt = jnp.zeros((n,), jnp.int32)
    w = jnp.zeros((h, v))

    def temp_bytes(chunk):
        f = jax.jit(jax.grad(lambda hid, w: jnp.sum(
            head_logprobs(hid, tgt, w, chunk_size=chunk).logprobs), argnums=(0, 1)))
        return f.lower(hid, w).compile().memory_analysis().temp_size_in_bytes

    full = n * v * 4
    small = temp_bytes(128)
    assert small < full / 4, (small, full)
    assert temp_bytes(2048) > small


def test_packed_equals_unpacked_logprobs():
    model = perturbed_model(LAYOUTS["qwen2"], LORA)
    rng = np.random.default_rng(1)
    lengths = [7, 4, 9, 3, 5]
    seqs = [rng.integers(0, 101, n) for n in lengths]

    graphdef, state = nnx.split(model)
    logprobs = jax.jit(lambda st, t, p, s: token_logprobs(nnx.merge(graphdef, st), t, p, s,
                                                          chunk_size=8).logprobs)

    def run(rows, length):
        seg, placement, _ = pack(lengths, rows, length)
        tokens = scatter(placement, seqs, rows, length, dtype=np.int32)
        pos = scatter(placement, [np.arange(n) for n in lengths], rows, length, dtype=np.int32)
        lp = logprobs(state, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
        return [np.asarray(lp)[r, s:s + n] for r, s, n in placement]

    packed = run(rows=2, length=16)
    unpacked = run(rows=5, length=10)
    for a, b in zip(packed, unpacked, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
        assert a[0] == 0.0


def test_attention_never_crosses_segments():
    model = perturbed_model(LAYOUTS["llama"], LORA)
    seg = jnp.asarray([[1] * 6 + [2] * 6 + [0] * 2])
    pos = jnp.asarray([list(range(6)) * 2 + [0, 0]])
    rng = np.random.default_rng(2)
    a = rng.integers(0, 101, (1, 14))
    b = a.copy()
    b[0, :6] = rng.integers(0, 101, 6)  # change segment 1 only
    b[0, 12:] = rng.integers(0, 101, 2)  # and the padding
    lp_a = token_logprobs(model, jnp.asarray(a), pos, seg).logprobs
    lp_b = token_logprobs(model, jnp.asarray(b), pos, seg).logprobs
    np.testing.assert_array_equal(lp_a[0, 6:], lp_b[0, 6:])
    assert np.all(np.asarray(lp_a[0, 12:]) == 0.0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (3, 3)])
def test_blocked_attention_equals_dense_reference(heads, kv_heads):
    """``attend`` in causal blocks (grouped heads stacked along the query rows) against a dense
    numpy softmax over the packed mask, with k/v repeated per head: packed segments, padding, a
    row length that is no multiple of the block; and its gradients against one block."""
    rng = np.random.default_rng(4)
    b, t, d = 2, 21, 8
    q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
    seg = np.array([[1] * 9 + [2] * 10 + [0] * 2, [1] * 21])
    mask = np.asarray(packed_mask(jnp.asarray(seg)))
    out = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                            causal_block=5))
    rep = heads // kv_heads
    kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(d)
    scores = np.where(mask[:, None], scores, -np.inf)
    real = seg > 0
    scores = np.where(real[:, None, :, None], scores, 0.0)  # padding queries: ignored below
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(out[real], want[real], atol=2e-6, rtol=1e-5)

    w = jnp.asarray(rng.normal(size=(b, t, heads, d)).astype(np.float32) * real[..., None, None])

    def loss(q, k, v, block):
        return jnp.sum(attend(q, k, v, jnp.asarray(mask), causal_block=block) * w)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    grads = [grad_fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block)
             for block in (5, None)]
    for blocked, dense in zip(*grads, strict=True):
        np.testing.assert_allclose(blocked, dense, atol=1e-5, rtol=1e-5)


def test_remat_gives_same_values_and_gradients():
    model = perturbed_model(LAYOUTS["qwen3"], LORA)
    graphdef, lora, base = split_lora(model)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 101, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)

    def f(lora, remat):
        m = nnx.merge(graphdef, lora, base)
        return jnp.sum(token_logprobs(m, tokens, pos, seg, remat=remat).logprobs)

    grad_fn = jax.jit(jax.value_and_grad(f), static_argnums=1)
    v0, g0 = grad_fn(lora, False)
    v1, g1 = grad_fn(lora, True)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_adapters_off_is_the_base_model():
    cfg = LAYOUTS["qwen2"]
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 101, (2, 9)))
    fresh = CausalLM(cfg, LORA, rngs=nnx.Rngs(0))  # B = 0
    np.testing.assert_array_equal(fresh(tokens), fresh(tokens, use_lora=False))
    tuned = perturbed_model(cfg, LORA)
    assert not np.allclose(tuned(tokens), tuned(tokens, use_lora=False), atol=1e-3)
    # adapters off == a LoRA-free model holding the same base weights
    plain = CausalLM(cfg, None, rngs=nnx.Rngs(7))
    _, _, base = split_lora(tuned)
    nnx.update(plain, base)
    np.testing.assert_array_equal(tuned(tokens, use_lora=False), plain(tokens))
    merged = merge_lora(tuned)
    np.testing.assert_allclose(merged(tokens), tuned(tokens), atol=2e-5)


@pytest.mark.parametrize("layout", ["qwen2", "qwen3"])  # untied and tied LM head
@pytest.mark.parametrize("fold,transpose", [(True, True), (True, False), (False, True)])
def test_prepared_decode_weights_give_the_same_logits(layout, fold, transpose):
    cfg = LAYOUTS[layout]
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 101, (2, 9)))
    tuned = perturbed_model(cfg, LORA)
    graphdef, state = nnx.split(tuned)

    @jax.jit
    def prepared_logits(state, tokens):
        model = nnx.merge(graphdef, state)
        prepare_decode_weights(model, fold=fold, transpose=transpose)
        return model(tokens, use_lora=False), model.lm_head_kernel()

    logits, head = prepared_logits(state, tokens)
    np.testing.assert_allclose(logits, tuned(tokens, use_lora=fold), atol=2e-5)
    np.testing.assert_array_equal(head, tuned.lm_head_kernel())  # [hidden, vocab] either way
    if fold:  # the adapters were folded in, not dropped
        assert not np.allclose(logits, tuned(tokens, use_lora=False), atol=1e-3)


@pytest.mark.parametrize("layout", [pytest.param("llama", marks=pytest.mark.slow), "qwen2",
                                    "qwen3"])  # llama: 68 s in CI, run with `-m slow`
def test_feature_major_decode_step_equals_extend(layout):
    """The CPU decode step (kernels [out, in], activations [features, rows]) gives the logits
    and the cache of ``extend`` + ``logits`` on the unprepared model; a row fed nothing keeps
    its cache; a window narrower than the cache changes nothing."""
    cfg = LAYOUTS[layout]
    tuned = perturbed_model(cfg, LORA)
    graphdef, state = nnx.split(tuned)
    rng = np.random.default_rng(7)
    lens = jnp.asarray([5, 3, 4], jnp.int32)
    _, cache = tuned.extend(init_cache(cfg, 3, 16), jnp.asarray(rng.integers(0, 101, (3, 5))),
                            lens)
    tokens = jnp.asarray(rng.integers(0, 101, (3,)), jnp.int32)
    feed = jnp.asarray([1, 0, 1], jnp.int32)
    hidden, want_cache = tuned.extend(cache, tokens[:, None], feed)
    want = tuned.logits(hidden[:, 0])

    @functools.partial(jax.jit, static_argnames=("window", "kernel"))
    def step(state, cache, window, kernel):
        model = nnx.merge(graphdef, state)
        prepare_decode_weights(model, fold=True, transpose=True, attention_kernel=kernel)
        assert model.feature_major_decode
        assert model.decode_attention_kernel == (kernel and HAVE_CXX)
        return model.decode_logits(cache, tokens, feed, use_lora=False, window=window)

    # the C++ attention kernel over the whole cache; XLA's attention over a narrower window
    for window, kernel in ((None, True), (8, False)):
        logits, got_cache = step(state, cache, window, kernel)
        np.testing.assert_allclose(logits[feed > 0], want[feed > 0], atol=2e-5)
        np.testing.assert_array_equal(got_cache.lengths, lens + feed)
        for got, ref, before in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v,
                                    cache.k + cache.v, strict=True):
            np.testing.assert_allclose(got, ref, atol=2e-5)
            np.testing.assert_array_equal(got[1], before[1])  # the row fed nothing


def test_lora_step_updates_only_lora():
    model = perturbed_model(LAYOUTS["llama"], LORA)
    graphdef, lora, base = split_lora(model)
    base_before = jax.tree.map(np.asarray, base)
    lora_before = jax.tree.map(np.asarray, lora)
    rng = np.random.default_rng(5)
    batch = dict(tokens=jnp.asarray(rng.integers(0, 101, (2, 10))),
                 adv=jnp.asarray(rng.normal(size=(2, 10)).astype(np.float32)))

    def loss_fn(m, b):
        lp = token_logprobs(m, b["tokens"], jnp.broadcast_to(jnp.arange(10), (2, 10)),
                           jnp.ones((2, 10), jnp.int32)).logprobs
        return -jnp.mean(lp * b["adv"]), {}

    tx = optax.sgd(0.1)
    step = make_lora_train_step(graphdef, tx, loss_fn)
    lora, _, loss, _, gnorm = step(lora, tx.init(lora), base, batch)
    assert float(gnorm) > 0 and np.isfinite(float(loss))
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora), strict=True)]
    assert all(changed)
    n_lora = sum(x.size for x in jax.tree.leaves(lora))
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert n_lora < n_base / 5


# ----------------------------------------------------------------------------------- decoding


@jax.jit
def _padded_logprobs(graphdef, state, tokens, n):
    length = tokens.shape[1]
    seg = (jnp.arange(length) < n).astype(jnp.int32)[None]
    model = nnx.merge(graphdef, state)
    return token_logprobs(model, tokens, jnp.arange(length)[None], seg).logprobs[0]


def _episode_logprobs(model, seq, length=128):
    """Full-forward log-probs of one episode (padded to a fixed length: one compilation)."""
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(seq)] = seq
    graphdef, state = nnx.split(model)
    return np.asarray(_padded_logprobs(graphdef, state, jnp.asarray(tokens), len(seq)))[:len(seq)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cache_decoding_equals_full_forward_over_turns(layout):
    model = perturbed_model(LAYOUTS[layout], LORA)
    rng = np.random.default_rng(6)
    b, bucket = 3, 16
    prompt_lens = np.array([5, 16, 9])
    prompts = rng.integers(0, 101, (b, bucket))
    cache = init_cache(model.cfg, b, 96)
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=10)
    out = generate(model, cache, prompts, prompt_lens, jax.random.key(0), params)
    episodes = [list(prompts[i, :prompt_lens[i]])
                + list(np.asarray(out.tokens[i, :out.num_tokens[i]])) for i in range(b)]
    behaviour = [list(np.asarray(out.logprobs[i, :out.num_tokens[i]])) for i in range(b)]
    # next turn: feed the last sampled token + an appended "tool result"; the cache is reused
    cache = out.cache
    for turn in range(2):
        appended = [rng.integers(0, 101, 3 + turn) for _ in range(b)]
        held = np.asarray(cache.lengths)
        feed = [np.asarray(episodes[i][held[i]:] + list(appended[i])) for i in range(b)]
        inputs = np.zeros((b, bucket), np.int64)
        for i in range(b):
            inputs[i, :len(feed[i])] = feed[i]
            episodes[i] += list(appended[i])
        out = generate(model, cache, inputs, np.array([len(f) for f in feed]),
                       jax.random.key(turn + 1), params)
        for i in range(b):
            n = int(out.num_tokens[i])
            start = len(episodes[i])
            episodes[i] += list(np.asarray(out.tokens[i, :n]))
            full = _episode_logprobs(model, episodes[i])
            np.testing.assert_allclose(np.asarray(out.logprobs[i, :n]), full[start:start + n],
                                       atol=3e-5)
        cache = out.cache
    for i in range(b):  # first turn too
        full = _episode_logprobs(model, episodes[i])
        n0 = len(behaviour[i])
        np.testing.assert_allclose(behaviour[i], full[prompt_lens[i]:prompt_lens[i] + n0],
                                   atol=3e-5)


def test_sampling_controls():
    model = perturbed_model(LAYOUTS["qwen2"], LORA)
    prompts = np.random.default_rng(7).integers(0, 101, (2, 16))
    lens = np.array([4, 11])

    def run(params, **kw):
        return generate(model, init_cache(model.cfg, 2, 64), prompts, lens, jax.random.key(3),
                        params, **kw)

    greedy = run(SamplingParams(temperature=0.0, max_tokens=8))
    top1 = run(SamplingParams(temperature=1.0, top_k=1, max_tokens=8))
    nucleus = run(SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8))
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    np.testing.assert_array_equal(greedy.tokens, nucleus.tokens)
    # stop on a token the greedy run emits at step 2 of row 0
    stop = int(greedy.tokens[0, 2])
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == stop))
    stopped = run(SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(stop,)))
    assert bool(stopped.stopped[0]) and int(stopped.num_tokens[0]) == first + 1
    assert np.all(np.asarray(stopped.tokens[0, first + 1:]) == 0)
    # per-row budgets
    limited = run(SamplingParams(temperature=0.0, max_tokens=8), max_new=jnp.array([3, 8]))
    np.testing.assert_array_equal(limited.num_tokens, [3, 8])
    np.testing.assert_array_equal(limited.tokens[0, :3], greedy.tokens[0, :3])
    # a full cache ends the row
    small = generate(model, init_cache(model.cfg, 2, 14), prompts, lens, jax.random.key(3),
                     SamplingParams(temperature=0.0, max_tokens=8))
    assert int(small.num_tokens[1]) == 14 - 11 + 1 and not bool(small.stopped[1])


def test_decode_windows():
    assert decode_windows(4096) == [256, 512, 1024, 2048, 4096]
    assert decode_windows(1000) == [256, 512, 1000]
    assert decode_windows(512) == [256, 512] and decode_windows(256) == [256]
    assert decode_windows(200) == [200]
    assert decode_windows(64, 8) == [8, 16, 32, 64]
    assert decode_windows(4096, None) == [4096]


def test_windowed_decoding_equals_whole_cache_decoding():
    """Prefills and steps that attend over windows of the cache (16, 32, then all 64 slots)
    give the tokens, log-probs and cache of attending over all 64, over two turns; rows cross
    window borders at different steps, one stops early on its budget, one fills the cache."""
    model = perturbed_model(LAYOUTS["qwen2"], LORA)
    rng = np.random.default_rng(11)
    prompts = rng.integers(0, 101, (3, 16))
    lens = np.array([3, 14, 7])
    appended = rng.integers(0, 101, (3, 4))
    params = SamplingParams(temperature=1.0, max_tokens=48)

    def two_turns(min_window, kernel):
        first = generate(model, init_cache(model.cfg, 3, 64), prompts, lens, jax.random.key(5),
                         params, max_new=jnp.array([6, 15, 2]), min_window=min_window,
                         attention_kernel=kernel)
        # next turn: each row's last sampled token + 4 appended tokens; the longest row then
        # holds 33 tokens, one past the 32-slot window
        last = first.tokens[jnp.arange(3), first.num_tokens - 1]
        inputs = jnp.concatenate([last[:, None], jnp.asarray(appended, jnp.int32),
                                  jnp.zeros((3, 11), jnp.int32)], axis=1)  # one input shape
        second = generate(model, first.cache, inputs, np.array([5, 5, 5]), jax.random.key(6),
                          params, max_new=jnp.array([48, 48, 3]), min_window=min_window,
                          attention_kernel=kernel)
        return first, second

    # windowed: XLA's attention in every phase; whole: the C++ kernel's decode steps (one loop
    # body, each row reading its own slots) where a compiler is
    whole, windowed = two_turns(None, True), two_turns(16, False)
    for w, a in zip(windowed, whole, strict=True):
        np.testing.assert_array_equal(w.num_tokens, a.num_tokens)
        np.testing.assert_array_equal(w.tokens, a.tokens)
        np.testing.assert_allclose(w.logprobs, a.logprobs, atol=1e-5)
    w, a = windowed[1].cache, whole[1].cache  # (the first turn's caches went to the second)
    np.testing.assert_array_equal(w.lengths, a.lengths)
    for x, y in zip(w.k + w.v, a.k + a.v, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    first, second = windowed
    np.testing.assert_array_equal(first.num_tokens, [6, 15, 2])
    np.testing.assert_array_equal(second.num_tokens, [48, 64 - 33 + 1, 3])
    # and the windowed log-probs are the full forward's
    for i in range(3):
        n1, n2 = int(first.num_tokens[i]), int(second.num_tokens[i])
        seq = (list(prompts[i, :lens[i]]) + list(np.asarray(first.tokens[i, :n1]))
               + list(appended[i]))
        start = len(seq)
        seq += list(np.asarray(second.tokens[i, :n2]))
        full = _episode_logprobs(model, seq)
        np.testing.assert_allclose(np.asarray(first.logprobs[i, :n1]),
                                   full[lens[i]:lens[i] + n1], atol=3e-5)
        np.testing.assert_allclose(np.asarray(second.logprobs[i, :n2]),
                                   full[start:start + n2], atol=3e-5)


def test_no_recompilation_across_turns():
    model = perturbed_model(LAYOUTS["qwen3"], LORA)
    params = SamplingParams(temperature=1.0, max_tokens=6)
    cache = init_cache(model.cfg, 2, 80)
    rng = np.random.default_rng(8)
    before = _generate_jit._cache_size()
    for turn in range(4):
        n = rng.integers(1, 9, 2)
        inputs = np.zeros((2, bucket_length(8)), np.int64)
        out = generate(model, cache, inputs, n, jax.random.key(turn), params)
        cache = out.cache
    assert _generate_jit._cache_size() - before == 1


# ----------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_save_load_roundtrip(tmp_path, layout):
    model = perturbed_model(LAYOUTS[layout])
    save_model(model, tmp_path / "one")
    save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 101, (1, 8)))
    for d in ("one", "sharded"):
        loaded = load_model(tmp_path / d)
        assert loaded.cfg == model.cfg
        np.testing.assert_array_equal(loaded(tokens), model(tokens))
    with_lora = load_model(tmp_path / "one", lora=LORA)
    np.testing.assert_array_equal(with_lora(tokens), model(tokens))  # fresh adapters: B = 0


def test_load_errors_name_the_problem(tmp_path):
    model = perturbed_model(LAYOUTS["qwen2"])
    save_model(model, tmp_path)
    cfg_path = tmp_path / "config.json"
    hf = json.loads(cfg_path.read_text())

    hf_bad = dict(hf, model_type="gpt2")
    cfg_path.write_text(json.dumps(hf_bad))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path)

    cfg_path.write_text(json.dumps(dict(hf, intermediate_size=128)))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' "
                                         r"has shape \((96, 64|64, 96)\), the config implies"):
        load_model(tmp_path)

    cfg_path.write_text(json.dumps(dict(hf, num_hidden_layers=3)))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\).*model.layers.2"):
        load_model(tmp_path)

    cfg_path.write_text(json.dumps(dict(hf, num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"do not fit.*model.layers.1"):
        load_model(tmp_path)

    cfg_path.write_text(json.dumps(dict(hf, rope_parameters={"rope_type": "dynamic",
                                                              "factor": 2.0})))
    with pytest.raises(ValueError, match="dynamic"):
        load_model(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRAConfig(targets=("q", "qkv"))
    cfg = LAYOUTS["qwen2"]
    assert ModelConfig.from_hf(cfg.to_hf_dict()) == cfg
    assert ModelConfig.from_hf(LAYOUTS["llama"].to_hf_dict()) == LAYOUTS["llama"]
    assert CausalLM(cfg, rngs=nnx.Rngs(0)) is not None
    n = sum(x.size for x in jax.tree.leaves(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)))))
    assert n == cfg.num_params()


def test_bfloat16_params_and_compute_track_float32(tmp_path):
    model = perturbed_model(LAYOUTS["qwen3"], LORA)
    save_model(model, tmp_path)
    bf16 = load_model(tmp_path, lora=LORA, dtype="bfloat16", param_dtype="bfloat16")
    assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    assert bf16.layers[0].mlp.up_proj.lora_a[...].dtype == jnp.float32  # adapters stay f32
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, 101, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    lp32 = token_logprobs(load_model(tmp_path, lora=LORA), tokens, pos, seg).logprobs
    lp16 = token_logprobs(bf16, tokens, pos, seg).logprobs
    assert lp16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lp16 - lp32))) < 0.1
    assert float(jnp.max(jnp.abs(lp16 - lp32))) > 0.0


def test_lora_targets_subset():
    cfg = LAYOUTS["llama"]
    model = CausalLM(cfg, LoRAConfig(rank=2, alpha=4.0, targets=("q", "v")), rngs=nnx.Rngs(0))
    layer = model.layers[0]
    assert layer.self_attn.q_proj.lora_a is not None and layer.self_attn.v_proj.lora_a is not None
    assert layer.self_attn.k_proj.lora_a is None and layer.mlp.up_proj.lora_a is None
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    h, d, r = cfg.hidden_size, cfg.head_dim, 2
    per_layer = (h * r + r * cfg.num_heads * d) + (h * r + r * cfg.num_kv_heads * d)
    assert n == cfg.num_layers * per_layer


@pytest.mark.parametrize("vocab", [101, 8192])  # not a multiple of the block, and one that is
def test_inverse_cdf_draws_follow_the_distribution(vocab):
    from mtrl_jax.models.decoding import _inverse_cdf_sample

    rng = np.random.default_rng(11)
    logits = rng.normal(size=(vocab,)).astype(np.float32) * 2.0
    logits[rng.choice(vocab, vocab // 3, replace=False)] = -np.inf  # impossible tokens
    logits[-1] = -np.inf  # the top end too
    n = 40_000
    toks = np.asarray(_inverse_cdf_sample(jnp.broadcast_to(jnp.asarray(logits), (n, vocab)),
                                          jax.random.uniform(jax.random.key(0), (n, 1))))
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    assert (p[toks] > 0).all()  # never an impossible token
    counts = np.bincount(toks, minlength=vocab)
    # the 20 likeliest tokens: counts within 5 binomial standard deviations
    top = np.argsort(-p)[:20]
    sd = np.sqrt(n * p[top] * (1 - p[top]))
    assert (np.abs(counts[top] - n * p[top]) < 5 * sd + 1).all()
    # and the total variation distance is at sampling-noise level: that of numpy's own draw
    p64 = p.astype(np.float64) / p.astype(np.float64).sum()
    ref = np.bincount(rng.choice(vocab, n, p=p64), minlength=vocab)
    tv, tv_ref = (0.5 * np.abs(c / n - p).sum() for c in (counts, ref))
    assert tv < 1.2 * tv_ref + 0.005, (tv, tv_ref)
