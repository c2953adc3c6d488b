"""Long inputs are encoded in chunks (a 4,096-token prompt at once needs attention scores of
~10 GB for 16 rows of SmolLM2): the result must equal encoding them at once, and the shared
prompt prefill must equal each row encoding its own prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.models import LoRAConfig, init_cache
from mtrl_jax.models.decoding import SamplingParams, generate, prefill_shared
from tests.model_helpers import LAYOUTS, perturbed_model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_prefill_equals_one_call(temperature):
    model = perturbed_model(LAYOUTS["qwen2"], LoRAConfig(rank=2), seed=3)
    rng = np.random.default_rng(0)
    num = np.array([64, 5, 16, 17, 0, 40])  # within, at and across chunk edges; a skipped row
    inputs = np.zeros((6, 64), np.int32)
    for r, n in enumerate(num):
        inputs[r, :n] = rng.integers(1, 101, n)
    params = SamplingParams(temperature=temperature, max_tokens=8)
    outs = {}
    for chunk in (None, 16):
        cache = init_cache(model.cfg, 6, 128)
        cache = cache._replace(lengths=cache.lengths.at[:].set(0))
        outs[chunk] = generate(model, cache, jnp.asarray(inputs), jnp.asarray(num),
                               jax.random.key(1), params, max_new=jnp.asarray((num > 0) * 8),
                               max_new_tokens=8, prefill_chunk=chunk)
    a, b = outs[None], outs[16]
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(a.cache.lengths), np.asarray(b.cache.lengths))
    for ka, kb in zip(a.cache.k, b.cache.k, strict=True):
        np.testing.assert_allclose(np.asarray(ka), np.asarray(kb), atol=1e-4)


def test_shared_prefill_equals_each_row_encoding_its_own_prompt():
    model = perturbed_model(LAYOUTS["llama"], LoRAConfig(rank=2), seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 101, 40), rng.integers(1, 101, 23)]
    rows = [0, 1, 0, 0, 1]  # slot -> prompt
    params = SamplingParams(temperature=0.0, max_tokens=6)
    width = 48
    full = np.zeros((5, width), np.int32)
    for r, p in enumerate(rows):
        full[r, :len(prompts[p])] = prompts[p]
    n_full = np.array([len(prompts[p]) for p in rows])
    flat = generate(model, init_cache(model.cfg, 5, 96), jnp.asarray(full), jnp.asarray(n_full),
                    jax.random.key(0), params, max_new_tokens=6)
    # the prompts minus their last token, once each; then each slot feeds its last token
    pre = np.zeros((2, 48), np.int32)
    for i, p in enumerate(prompts):
        pre[i, :len(p) - 1] = p[:-1]
    cache = prefill_shared(model, init_cache(model.cfg, 5, 96), jnp.asarray(pre),
                           jnp.asarray([len(p) - 1 for p in prompts]), jnp.asarray(rows),
                           jnp.ones((5,), bool))
    np.testing.assert_array_equal(np.asarray(cache.lengths), n_full - 1)
    last = np.zeros((5, 16), np.int32)
    last[:, 0] = [prompts[p][-1] for p in rows]
    shared = generate(model, cache, jnp.asarray(last), jnp.ones((5,), jnp.int32),
                      jax.random.key(0), params, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(flat.tokens), np.asarray(shared.tokens))
    np.testing.assert_allclose(np.asarray(flat.logprobs), np.asarray(shared.logprobs),
                               atol=1e-4)
