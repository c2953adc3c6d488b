"""Test-wide settings: CPU JAX, deterministic hypothesis profiles."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# generated task data goes to a fresh folder per test session, never the user's cache
os.environ["MTRL_DATA_DIR"] = _DATA = tempfile.mkdtemp(prefix="mtrl-test-data-")

from hypothesis import HealthCheck, settings

atexit.register(shutil.rmtree, _DATA, True)

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
