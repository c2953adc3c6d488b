"""The glibc re-exec (mtrl_jax/runtime.py) is an XLA:CPU remedy: chosen only when JAX will run
on the CPU."""

import importlib.util

from mtrl_jax import runtime


def test_the_cpu_is_expected_unless_jax_platforms_or_a_plugin_says_otherwise(monkeypatch):
    assert runtime.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "cuda"})
    assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert runtime.cpu_backend_expected({})
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "jax_cuda13_plugin" else real(name))
    assert not runtime.cpu_backend_expected({})
    assert runtime.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})  # asked for: the CPU


def test_a_child_gets_the_tunable_only_for_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "_thp_available", lambda: True)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    env = runtime.fast_malloc_env({"JAX_PLATFORMS": "cpu"})
    assert runtime.MALLOC_TUNABLE in env["GLIBC_TUNABLES"]
    assert "GLIBC_TUNABLES" not in runtime.fast_malloc_env({"JAX_PLATFORMS": "cuda"})
    assert "GLIBC_TUNABLES" not in runtime.fast_malloc_env(
        {"JAX_PLATFORMS": "cpu", "MTRL_NO_REEXEC": "1"})
