"""mtrl_jax: multi-turn agentic reinforcement learning of language models in JAX/Flax.

Map of the package:

- ``mtrl_jax.kernels``: pure functions of arrays (advantage estimators, policy losses,
  KL estimators, loss aggregation, pass@k). No models, configs or I/O.
- ``mtrl_jax.models``: the NNX decoder, HF checkpoints, LoRA, decoding, sharding.
- ``mtrl_jax.envs``, ``mtrl_jax.rollout``: environments, task families, the agent loop.
- ``mtrl_jax.config``: recipes: typed, frozen configs from YAML and dotted overrides.
- ``mtrl_jax.training``: the trainer, batch building, the update step, packing, checkpoints.
- ``mtrl_jax.tracking``: the tracker protocol (MLflow, in-memory, no-op).
- ``mtrl_jax.evaluation``: one definition of each metric, the external evaluator, reports and
  the run doctor.
"""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchNotice(_logging.Filter):
    """transformers says "PyTorch was not found" at import when torch is absent; this package
    uses it for configs, tokenizers and chat templates only, where that is the expected
    install, so the notice is dropped (every other transformers message stays)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


_logging.getLogger("transformers").addFilter(_NoTorchNotice())

__all__ = ["MultiTurnRLEvaluator", "MultiTurnRLTrainer", "load_config"]


def __getattr__(name):  # lazy: importing the package stays cheap
    if name == "MultiTurnRLTrainer":
        from mtrl_jax.training.trainer import MultiTurnRLTrainer

        return MultiTurnRLTrainer
    if name == "MultiTurnRLEvaluator":
        from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator

        return MultiTurnRLEvaluator
    if name == "load_config":
        from mtrl_jax.config import load_config

        return load_config
    raise AttributeError(f"module 'mtrl_jax' has no attribute {name!r}")
