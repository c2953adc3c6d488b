"""Rollouts from inference servers that speak vLLM's HTTP API.

- :mod:`~mtrl_jax.serving.protocol`: the subset of vLLM's API used here, field names and types
  written down from vLLM's docs and source (the version is named there), and a checker.
- :mod:`~mtrl_jax.serving.server`: ``mtrl serve``, our JAX model behind that API (the test
  double for vLLM here, and a serving path where vLLM is not the natural choice, e.g. TPU).
- :mod:`~mtrl_jax.serving.client`: :class:`ServerSampler`, the rollout backend
  (``rollout.backend: server``): token-in/token-out turns balanced over several servers, LoRA
  versions hot-loaded by name, a server that stops answering taken out.
"""
