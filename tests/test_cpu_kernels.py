"""The C++ decode-attention kernel (mtrl_jax.models.cpu_kernels) against XLA's formulation."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.models import cpu_kernels
from mtrl_jax.models.transformer import attend_cache

HAVE_CXX = cpu_kernels.find_compiler() is not None
needs_kernel = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler on this machine")


def _reference(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache):
    """XLA: the scatter of extend_t, then attend_cache over the clipped slot counts."""
    b = q.shape[2]
    s = k_cache.shape[-1]
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, :, :, write_pos].set(jnp.transpose(k_new, (2, 0, 1)), mode="drop")
    v_cache = v_cache.at[rows, :, write_pos].set(jnp.transpose(v_new, (2, 0, 1)), mode="drop")
    n = np.clip(np.asarray(n_valid), 1, s)
    mask = jnp.asarray(np.arange(s)[None, None, :] < n[:, None, None])
    out = attend_cache(jnp.transpose(q, (2, 0, 1))[:, None], k_cache, v_cache, mask)[:, 0]
    return jnp.transpose(out, (1, 2, 0)), k_cache, v_cache


def _inputs(rng, b, h, kv, d, s):
    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    return (normal(h, d, b), normal(kv, d, b, scale=2.0), normal(kv, d, b),
            normal(b, kv, d, s, scale=2.0), normal(b, kv, s, d))


@needs_kernel
def test_kernel_builds_where_a_compiler_is():
    assert cpu_kernels.decode_attention_available(), cpu_kernels._state.get("error")


def _check(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("h,kv,d,s", [(8, 2, 16, 37), (3, 3, 8, 20), (4, 1, 64, 130)])
def test_kernel_matches_xla_attention(h, kv, d, s):
    """Grouped and ungrouped heads, odd lengths; rows attending 1 slot, all slots, a middle
    count, out-of-range counts (clipped to [1, S]); rows writing the first slot, the last,
    the slot they attend up to, and nothing (S)."""
    assert cpu_kernels.decode_attention_available()
    rng = np.random.default_rng(h * 100 + s)
    q, k_new, v_new, k_cache, v_cache = _inputs(rng, 6, h, kv, d, s)
    n_valid = jnp.asarray([1, s, s // 2, 0, s + 9, 2], jnp.int32)
    write_pos = jnp.asarray([0, s - 1, s // 2 - 1, s, s, 1], jnp.int32)
    want = _reference(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache)
    kernel = jax.jit(cpu_kernels.decode_attention)
    got = kernel(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache)
    _check(got, want)
    # the slots past a row's count are never read: changing them changes nothing but themselves
    k2 = k_cache.at[2, :, :, s // 2:].set(1e4)
    v2 = v_cache.at[2, :, s // 2:, :].set(jnp.nan)
    again = kernel(q, k_new, v_new, write_pos, n_valid, k2, v2)
    np.testing.assert_array_equal(again[0], got[0])


@needs_kernel
def test_kernel_is_deterministic_across_threads():
    """Many (row, kv head) tasks shared between the calling thread and the pool: the same
    inputs give bitwise the same outputs, and each row its own; the caches are updated in place
    when donated (inside a jitted loop, as the decode loop carries them)."""
    assert cpu_kernels.decode_attention_available()
    rng = np.random.default_rng(3)
    b, s = 64, 96
    q, k_new, v_new, k_cache, v_cache = _inputs(rng, b, 8, 2, 32, s)
    n_valid = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    write_pos = n_valid - 1
    f = jax.jit(cpu_kernels.decode_attention)
    first = [np.asarray(x) for x in f(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache)]
    for _ in range(3):
        for x, y in zip(f(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache), first,
                        strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
    _check(first, _reference(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def three_steps(k_cache, v_cache):
        def step(i, carry):
            k_cache, v_cache, acc = carry
            out, k_cache, v_cache = cpu_kernels.decode_attention(
                q + i, k_new * i, v_new - i, write_pos + i, n_valid + i, k_cache, v_cache)
            return k_cache, v_cache, acc + out
        return jax.lax.fori_loop(0, 3, step, (k_cache, v_cache, jnp.zeros_like(q)))

    want_k, want_v, want_acc = k_cache, v_cache, jnp.zeros_like(q)
    for i in range(3):
        out, want_k, want_v = _reference(q + i, k_new * i, v_new - i, write_pos + i,
                                         n_valid + i, want_k, want_v)
        want_acc = want_acc + out
    _check(three_steps(jnp.array(k_cache), jnp.array(v_cache)), (want_k, want_v, want_acc))


def test_build_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    with pytest.raises(RuntimeError, match=r"failed on decode_attention\.cc"):
        cpu_kernels.build_library(tmp_path)
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        cpu_kernels.build_library(tmp_path)


@needs_kernel
def test_unwritable_cache_dir_builds_under_tmp(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    lib = cpu_kernels.build_library(blocker / "kernels")  # cannot be created under a file
    assert lib.parent == tmp_path / "mtrl_jax_kernels" and lib.exists()


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
