"""Mean and 95% CI over seeds (Student's t), checked against scipy and against hand values."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrl_jax.evaluation.metrics import mean_ci, t95


def test_hand_computed_interval():
    # mean 2, sd 1, n 3: half width 4.303 / sqrt(3)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0
    assert hi - m == pytest.approx(4.303 / np.sqrt(3), rel=1e-9)
    assert m - lo == pytest.approx(hi - m, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=2, max_size=40))
def test_matches_scipy(values):
    stats = pytest.importorskip("scipy.stats")
    m, lo, hi = mean_ci(values)
    if np.std(values) == 0:
        assert lo == hi == m
        return
    ref_lo, ref_hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                      scale=stats.sem(values))
    # the table holds 3 decimals of each quantile; beyond 30 degrees of freedom it uses 1.960
    tol = 5e-4 if len(values) <= 31 else 0.05
    assert m == pytest.approx(np.mean(values), abs=1e-12)
    # half widths compared relatively (the ends themselves may sit near 0)
    assert hi - m == pytest.approx((ref_hi - ref_lo) / 2, rel=tol, abs=1e-12)
    assert m - lo == pytest.approx((ref_hi - ref_lo) / 2, rel=tol, abs=1e-12)


def test_quantiles_decrease_with_degrees_of_freedom():
    qs = [t95(d) for d in range(1, 40)]
    assert all(a >= b for a, b in itertools.pairwise(qs))
    assert qs[-1] == 1.960


def test_one_seed_has_no_interval():
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci([0.5])
    with pytest.raises(ValueError, match="degree of freedom"):
        t95(0)
