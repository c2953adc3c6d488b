"""Test-wide settings: CPU JAX, data folders, deterministic hypothesis profiles."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# generated task data goes to a fresh folder per test session, never the user's cache
os.environ["MTRL_DATA_DIR"] = _DATA = tempfile.mkdtemp(prefix="mtrl-test-data-")

from hypothesis import HealthCheck, settings

atexit.register(shutil.rmtree, _DATA, True)

# one persistent XLA cache for the session (rollout worker processes share it already): many
# tests build the same tiny models and losses, and a program compiled once loads in a fraction
# of its compile time (8 s -> 0.8 s for a tiny train step)
import jax  # noqa: E402

if os.environ.get("MTRL_TEST_XLA_CACHE", "1") != "0":
    # one folder for the whole run: made by the first process that loads this file (pytest
    # itself, or the xdist controller) and inherited through the environment by the xdist
    # workers and by every process a test starts (trainers, rollout workers, servers), so a
    # program compiled in one of them loads in the others; removed by its maker at exit
    if "MTRL_TEST_XLA_CACHE_DIR" not in os.environ:
        os.environ["MTRL_TEST_XLA_CACHE_DIR"] = _XLA = tempfile.mkdtemp(prefix="mtrl-test-xla-")
        atexit.register(shutil.rmtree, _XLA, True)
    _XLA = os.environ["MTRL_TEST_XLA_CACHE_DIR"]
    for _key, _value in (("JAX_COMPILATION_CACHE_DIR", _XLA),
                         ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                         ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
        # set, not defaulted: with every compile cached, a user's own cache dir would fill up
        os.environ[_key] = _value
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# SOP-Bench data (CC BY-NC, evaluation and tests only) lies beside the clone, never in it
_SOP_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                          "shared", "sop-bench")
if "MTRL_SOP_BENCH_DIR" not in os.environ and os.path.isdir(_SOP_BENCH):
    os.environ["MTRL_SOP_BENCH_DIR"] = os.path.normpath(_SOP_BENCH)

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _missing_dependency_fails_under_ci(report) -> None:
    """A test skipped because an optional dependency did not import is a failure under CI
    (``CI=true``): CI installs every extra the tests use, so the skip means a broken install."""
    if not os.environ.get("CI") or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "could not import" in reason:
        report.outcome = "failed"
        report.longrepr = f"under CI every test dependency must be installed: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _missing_dependency_fails_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _missing_dependency_fails_under_ci(outcome.get_result())
