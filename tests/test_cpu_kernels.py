"""The C++ decode-attention kernel (mtrl_jax.models.cpu_kernels) against XLA's formulation."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.models import cpu_kernels
from mtrl_jax.models.transformer import attend_cache

HAVE_CXX = cpu_kernels.find_compiler() is not None
needs_kernel = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler on this machine")


def _reference(q, k, v, n_valid):
    s = k.shape[-1]
    n = np.clip(np.asarray(n_valid), 1, s)
    mask = jnp.asarray(np.arange(s)[None, None, :] < n[:, None, None])
    return attend_cache(q[:, None], k, v, mask)[:, 0]


def _inputs(rng, b, h, kv, d, s):
    q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32)
    k = jnp.asarray(2 * rng.standard_normal((b, kv, d, s)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv, s, d)), jnp.float32)
    return q, k, v


@needs_kernel
def test_kernel_builds_where_a_compiler_is():
    assert cpu_kernels.decode_attention_available(), cpu_kernels._state.get("error")


@needs_kernel
@pytest.mark.parametrize("h,kv,d,s", [(8, 2, 16, 37), (3, 3, 8, 20), (4, 1, 64, 130)])
def test_kernel_matches_xla_attention(h, kv, d, s):
    """Grouped and ungrouped heads, odd lengths; rows attending 1 slot, all slots, a middle
    count, and out-of-range counts (clipped to [1, S])."""
    assert cpu_kernels.decode_attention_available()
    rng = np.random.default_rng(h * 100 + s)
    q, k, v = _inputs(rng, 6, h, kv, d, s)
    n_valid = jnp.asarray([1, s, s // 2, 0, s + 9, 2], jnp.int32)
    got = jax.jit(cpu_kernels.decode_attention)(q, k, v, n_valid)
    np.testing.assert_allclose(got, _reference(q, k, v, n_valid), atol=2e-6, rtol=1e-5)
    # the slots past a row's count are never read: changing them changes nothing
    k2 = k.at[2, :, :, s // 2:].set(1e4)
    v2 = v.at[2, :, s // 2:, :].set(jnp.nan)
    np.testing.assert_array_equal(jax.jit(cpu_kernels.decode_attention)(q, k2, v2, n_valid),
                                  got)


@needs_kernel
def test_kernel_is_deterministic_across_threads():
    """Many (row, kv head) tasks shared between the calling thread and the pool: the same
    inputs give bitwise the same outputs, and each row its own."""
    assert cpu_kernels.decode_attention_available()
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 64, 8, 2, 32, 96)
    n_valid = jnp.asarray(rng.integers(1, 97, 64), jnp.int32)
    f = jax.jit(cpu_kernels.decode_attention)
    first = np.asarray(f(q, k, v, n_valid))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(q, k, v, n_valid)), first)
    np.testing.assert_allclose(first, _reference(q, k, v, n_valid), atol=2e-6, rtol=1e-5)


def test_build_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    with pytest.raises(RuntimeError, match=r"failed on decode_attention\.cc"):
        cpu_kernels.build_library(tmp_path)
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        cpu_kernels.build_library(tmp_path)


def test_disabled_kernel_falls_back(monkeypatch):
    from flax import nnx

    from mtrl_jax.models import CausalLM
    from mtrl_jax.models.transformer import prepare_decode_weights
    from tests.model_helpers import LAYOUTS

    monkeypatch.setenv("MTRL_JAX_CPU_KERNELS", "0")
    assert not cpu_kernels.decode_attention_available()
    model = CausalLM(LAYOUTS["qwen2"], rngs=nnx.Rngs(0))
    prepare_decode_weights(model, fold=False, transpose=True, attention_kernel=True)
    assert model.feature_major_decode and not model.decode_attention_kernel
