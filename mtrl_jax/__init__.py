"""mtrl_jax: multi-turn agentic reinforcement learning of language models in JAX/Flax.

Map of the package (see ``../shared/DESIGN.md`` in the team workspace):

- ``mtrl_jax.kernels``: pure functions of arrays (advantage estimators, policy losses,
  KL estimators, loss aggregation, pass@k). No models, configs or I/O.
- ``mtrl_jax.models``: the NNX decoder, HF checkpoints, LoRA, decoding, sharding.
- ``mtrl_jax.envs``, ``mtrl_jax.rollout``: environments, task families, the agent loop.
- ``mtrl_jax.training``: recipes, the trainer, packing, tracking, checkpoints.
- ``mtrl_jax.evaluation``: the external evaluator and the run doctor.
"""

__version__ = "0.1.0"

__all__ = ["MultiTurnRLEvaluator", "MultiTurnRLTrainer", "load_config"]


def __getattr__(name):  # lazy: importing the package stays cheap
    if name == "MultiTurnRLTrainer":
        from mtrl_jax.training.trainer import MultiTurnRLTrainer

        return MultiTurnRLTrainer
    if name == "MultiTurnRLEvaluator":
        from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator

        return MultiTurnRLEvaluator
    if name == "load_config":
        from mtrl_jax.training.config import load_config

        return load_config
    raise AttributeError(f"module 'mtrl_jax' has no attribute {name!r}")
