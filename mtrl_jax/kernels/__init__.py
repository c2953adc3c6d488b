"""Pure-functional RL kernels: functions of arrays only (no models, configs or I/O).

- :mod:`~mtrl_jax.kernels.advantages` -- group-based advantage estimators
  (:data:`ADVANTAGE_ESTIMATORS`) and group diagnostics.
- :mod:`~mtrl_jax.kernels.losses` -- policy losses (:data:`POLICY_LOSSES`), TIS correction,
  KL estimators, segment-aware aggregation.
- :mod:`~mtrl_jax.kernels.segments` -- packed-row reductions and token broadcast.
- :mod:`~mtrl_jax.kernels.passk` -- unbiased pass@k and pass^k.
"""

from mtrl_jax.kernels.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    GroupBasedParams,
    OPOParams,
    PassKParams,
    PerTurnParams,
    ReinforcePPParams,
    RLOOParams,
    compute_advantages,
    group_based_advantages,
    group_diagnostics,
    grpo_passk_advantages,
    opo_advantages,
    per_turn_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from mtrl_jax.kernels.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    CISPOParams,
    GSPOParams,
    ISParams,
    LossConfig,
    PolicyLoss,
    PolicyLossInputs,
    PPOParams,
    TISParams,
    aggregate,
    kl_estimate,
    policy_loss,
    tis_weights,
)
from mtrl_jax.kernels.passk import pass_at_k, pass_at_k_jax, pass_hat_k, pass_hat_k_jax
from mtrl_jax.kernels.segments import broadcast_to_tokens, segment_sum

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "AdvantageEstimator",
    "CISPOParams",
    "GSPOParams",
    "GroupBasedParams",
    "ISParams",
    "LossConfig",
    "OPOParams",
    "PPOParams",
    "PassKParams",
    "PerTurnParams",
    "PolicyLoss",
    "PolicyLossInputs",
    "RLOOParams",
    "ReinforcePPParams",
    "TISParams",
    "aggregate",
    "broadcast_to_tokens",
    "compute_advantages",
    "group_based_advantages",
    "group_diagnostics",
    "grpo_passk_advantages",
    "kl_estimate",
    "opo_advantages",
    "pass_at_k",
    "pass_at_k_jax",
    "pass_hat_k",
    "pass_hat_k_jax",
    "per_turn_advantages",
    "policy_loss",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "segment_sum",
    "tis_weights",
]
