"""mtrl_jax: multi-turn agentic reinforcement learning of language models in JAX/Flax.

Map of the package (see ``../shared/DESIGN.md`` in the team workspace):

- ``mtrl_jax.kernels``: pure functions of arrays (advantage estimators, policy losses,
  KL estimators, loss aggregation, pass@k). No models, configs or I/O.
"""

__version__ = "0.1.0"
