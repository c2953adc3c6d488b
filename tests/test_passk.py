"""pass@k and pass^k: brute-force counts, stability for large n, JAX == host versions."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.kernels import pass_at_k, pass_at_k_jax, pass_hat_k, pass_hat_k_jax
from tests import reference_np as ref


def test_matches_brute_force_on_small_n():
    cases = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]
    n, c, k = (np.array(x) for x in zip(*cases, strict=True))
    jax_at = np.asarray(jax.jit(lambda n, c: pass_at_k_jax(n, c, 1))(n, c))  # k=1 compiled once
    for (nn, cc, kk), at1 in zip(cases, jax_at, strict=True):
        want = ref.pass_at_k_bruteforce(nn, cc, kk)
        assert pass_at_k(nn, cc, kk) == pytest.approx(want, abs=1e-12)
        assert pass_hat_k(nn, cc, kk) == pytest.approx(ref.pass_hat_k_bruteforce(nn, cc, kk),
                                                       abs=1e-12)
        assert at1 == pytest.approx(cc / nn, abs=5e-6)
    for kk in range(1, 9):
        sel = k == kk
        got = np.asarray(pass_at_k_jax(jnp.asarray(n[sel]), jnp.asarray(c[sel]), kk))
        want = [ref.pass_at_k_bruteforce(*x) for x in zip(n[sel], c[sel], k[sel], strict=True)]
        np.testing.assert_allclose(got, want, atol=5e-6)
        got = np.asarray(pass_hat_k_jax(jnp.asarray(n[sel]), jnp.asarray(c[sel]), kk))
        want = [ref.pass_hat_k_bruteforce(*x) for x in zip(n[sel], c[sel], k[sel], strict=True)]
        np.testing.assert_allclose(got, want, atol=5e-6)


@pytest.mark.parametrize("n,c,k", [(500, 3, 100), (1000, 1, 999), (2000, 1000, 50),
                                   (300, 299, 2), (10_000, 7, 5000)])
def test_stable_for_large_n(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
    got = float(pass_at_k_jax(jnp.array([n]), jnp.array([c]), k)[0])
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(float(exact), rel=1e-3, abs=1e-5)
    exact_hat = Fraction(math.comb(c, k), math.comb(n, k))
    assert pass_hat_k(n, c, k) == pytest.approx(float(exact_hat), rel=1e-9, abs=1e-300)


def test_pass_at_k_is_monotone_in_k_and_c():
    n = 16
    table = np.array([[pass_at_k(n, c, k) for k in range(1, n + 1)] for c in range(n + 1)])
    assert np.all(np.diff(table, axis=0) >= -1e-12)
    assert np.all(np.diff(table, axis=1) >= -1e-12)
    assert np.all(table[0] == 0.0) and np.all(table[n] == 1.0)


def test_bad_input():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 2, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_hat_k(4, 5, 1)
    with pytest.raises(ValueError, match=r"'c' has shape \(3,\) but 'n' has shape \(2,\)"):
        pass_at_k_jax(jnp.array([4, 4]), jnp.array([1, 2, 3]), 2)
    assert np.isnan(pass_at_k_jax(jnp.array([3]), jnp.array([1]), 4)[0])
