"""Policy-gradient losses over packed rows, chosen by name (``loss`` in recipes).

All token-level arrays are ``[rows, L]`` packed rows (see :mod:`mtrl_jax.kernels.segments`):

- ``logprobs``: log pi_theta(y_t) of the trainer's current parameters (the only input with a
  gradient).
- ``old_logprobs``: log pi_old(y_t) of the policy that made the batch, for the PPO-style ratio
  ``r_t = pi_theta / pi_old`` (equal to ``stop_gradient(logprobs)`` on the first update).
- ``behaviour_logprobs``: log-probs reported by the sampler (vLLM, the JAX sampler, a stale
  worker), for the truncated importance-sampling (TIS) correction ``pi_old / mu``.
- ``ref_logprobs``: log pi_ref(y_t) for a KL penalty.
- ``advantages``: per-token advantages (use :func:`~mtrl_jax.kernels.segments.
  broadcast_to_tokens` for sequence- or turn-level ones).
- ``loss_mask``: 1 on the tokens the policy sampled; ``segment_ids``: 0 = padding.

A token counts only where ``loss_mask`` is set and ``segment_ids > 0``. Every other token gets
exactly zero gradient, whatever its inputs hold (``-inf`` and NaN included).

The loss for a name in :data:`POLICY_LOSSES` is assembled as

``loss_t = w_t^TIS * surrogate_t + kl_coef * KL_t - entropy_coef * H_t``

and reduced by a segment-aware aggregation (:data:`AGGREGATIONS`). ``policy_loss`` returns
``(loss, metrics)``; metrics are scalars (clip fraction, ratio stats, approximate KL, IS
weights, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from mtrl_jax.kernels import _validate as v
from mtrl_jax.kernels.registry import Registry
from mtrl_jax.kernels.segments import (
    gather_segments,
    masked_max,
    masked_mean,
    masked_min,
    segment_sum,
)

Array = jax.Array
sg = jax.lax.stop_gradient

AggregationName = Literal[
    "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
]
AGGREGATIONS: tuple[str, ...] = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)


class PolicyLossInputs(NamedTuple):
    """Per-token inputs of a policy loss, all ``[rows, L]`` (a pytree: jit/vmap friendly)."""

    logprobs: Array
    old_logprobs: Array
    advantages: Array
    loss_mask: Array
    segment_ids: Array
    behaviour_logprobs: Array | None = None
    ref_logprobs: Array | None = None
    entropy: Array | None = None


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _check_clip(name: str, clip_low: float, clip_high: float, low_max: float = 1.0) -> None:
    if not 0.0 <= clip_low <= low_max:
        raise ValueError(f"{name}: clip_low must be in [0, {low_max}], got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"{name}: clip_high must be >= 0, got {clip_high}")


@dataclasses.dataclass(frozen=True)
class PPOParams:
    """``ppo``: ratio clipped to ``[1 - clip_low, 1 + clip_high]``; optional dual clip ``c > 1``.

    Asymmetric ranges (``clip_high > clip_low``, DAPO's "clip-higher") leave more room for
    raising low-probability tokens.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None

    def __post_init__(self):
        _check_clip("ppo", self.clip_low, self.clip_high, low_max=1.0 - 1e-6)
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"ppo: dual_clip must be > 1, got {self.dual_clip}")


@dataclasses.dataclass(frozen=True)
class CISPOParams:
    """``cispo``: IS weight clipped to ``[1 - clip_low, 1 + clip_high]``.

    MiniMax-M1 sets no lower bound (``clip_low = 1`` here: weights >= 0) and tunes only the
    upper one.
    """

    clip_low: float = 1.0
    clip_high: float = 0.28

    def __post_init__(self):
        _check_clip("cispo", self.clip_low, self.clip_high)


@dataclasses.dataclass(frozen=True)
class ISParams:
    """``is``: importance weight ``pi_theta / pi_old`` truncated at ``max_weight``."""

    max_weight: float = 2.0

    def __post_init__(self):
        if self.max_weight <= 0:
            raise ValueError(f"is: max_weight must be > 0, got {self.max_weight}")


@dataclasses.dataclass(frozen=True)
class GSPOParams:
    """``gspo``: sequence ratio clipped to ``[1 - clip_low, 1 + clip_high]``.

    The GSPO paper uses ranges of order 1e-4 (3e-4 / 4e-4) because a length-normalised sequence
    ratio moves far less than token ratios.
    """

    clip_low: float = 3e-4
    clip_high: float = 4e-4

    def __post_init__(self):
        _check_clip("gspo", self.clip_low, self.clip_high, low_max=1.0 - 1e-6)


@dataclasses.dataclass(frozen=True)
class TISParams:
    """Truncated importance sampling for the sampler-vs-trainer mismatch.

    ``w = pi_old / mu`` (``mu`` = behaviour log-probs from the sampler), at the chosen ``level``:

    - ``token``: per token ``exp(old_t - mu_t)``;
    - ``sequence``: the product over the segment's loss tokens (exact, high variance);
    - ``geometric``: ``exp(mean_t (old_t - mu_t))`` over the segment (length-normalised).

    ``mode``: ``none``; ``truncate`` -> ``min(w, cap)`` (Yao et al., 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training"); ``mask`` -> ``w * 1[w <= cap]``
    (drops the tokens or sequences whose weight exceeds the cap). The weight is a constant
    (stop-gradient) multiplier of the surrogate, so it combines with every loss.
    """

    mode: Literal["none", "truncate", "mask"] = "none"
    level: Literal["token", "sequence", "geometric"] = "token"
    cap: float = 2.0

    def __post_init__(self):
        if self.mode not in ("none", "truncate", "mask"):
            raise ValueError(f"tis.mode must be none|truncate|mask, got {self.mode!r}")
        if self.level not in ("token", "sequence", "geometric"):
            raise ValueError(f"tis.level must be token|sequence|geometric, got {self.level!r}")
        if self.cap <= 0:
            raise ValueError(f"tis.cap must be > 0, got {self.cap}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What every loss shares: aggregation, KL penalty, entropy bonus, TIS correction.

    Attributes:
      aggregation: one of :data:`AGGREGATIONS` (see :func:`aggregate`).
      norm_length: the constant of ``seq_mean_token_sum_norm`` (e.g. the generation budget).
      kl_coef: weight of the KL penalty against ``ref_logprobs`` (0 = off).
      kl_estimator: ``k1``, ``k2`` or ``k3`` (see :func:`kl_estimate`).
      entropy_coef: weight of the entropy bonus; needs a per-token ``entropy`` input.
      tis: :class:`TISParams`.
    """

    aggregation: AggregationName = "token_mean"
    norm_length: int | None = None
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    tis: TISParams = TISParams()

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation == "seq_mean_token_sum_norm" and not (self.norm_length or 0) > 0:
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs norm_length > 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1|k2|k3, got {self.kl_estimator!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be >= 0")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def kl_estimate(logprobs: Array, ref_logprobs: Array, estimator: str) -> Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_theta.

    With ``log rho = ref - logp`` (Schulman, 2020, "Approximating KL Divergence"):

    - ``k1 = -log rho`` (unbiased, high variance, can be negative);
    - ``k2 = (log rho)^2 / 2`` (biased, low variance; as a loss its gradient is the on-policy
      gradient of the reverse KL);
    - ``k3 = (rho - 1) - log rho`` (unbiased, >= 0, low variance; as a loss its gradient is
      *not* the reverse-KL gradient -- see Tang & Munos, 2025, on KL-gradient pitfalls).
    """
    log_rho = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    if estimator == "k3":
        return jnp.expm1(log_rho) - log_rho
    raise ValueError(f"unknown kl_estimator {estimator!r}; use k1, k2 or k3")


def segment_mean_tokens(x: Array, mask: Array, segment_ids: Array) -> Array:
    """Per token: the mean of ``x`` over the loss tokens of its segment. ``[rows, L]``."""
    m = mask.astype(jnp.float32)
    sums = segment_sum(jnp.where(mask, x, 0.0), segment_ids)
    counts = segment_sum(m, segment_ids)
    return gather_segments(sums / jnp.maximum(counts, 1.0), segment_ids)


def _num_segments(mask: Array, segment_ids: Array) -> Array:
    counts = segment_sum(mask.astype(jnp.float32), segment_ids)
    return jnp.sum((counts[:, 1:] > 0).astype(jnp.float32))


def aggregate(
    per_token: Array,
    mask: Array,
    segment_ids: Array,
    mode: str,
    *,
    norm_length: int | None = None,
    denominator: Array | float | None = None,
) -> Array:
    """Reduce a per-token loss ``[rows, L]`` to a scalar, segment-aware.

    - ``token_mean``: ``sum_t l_t / #tokens`` over all loss tokens of the batch (DAPO);
    - ``seq_mean_token_mean``: mean over segments of each segment's token mean (GRPO paper);
    - ``seq_mean_token_sum``: mean over segments of each segment's token sum;
    - ``seq_mean_token_sum_norm``: ``sum_t l_t / (#segments * norm_length)`` (Dr. GRPO's
      constant normaliser).

    A segment counts when it holds at least one loss token. ``denominator``, when given,
    replaces ``#tokens`` (``token_mean``) or ``#segments`` (the others) so that micro-batches of
    one global batch can be normalised by the global count.
    """
    m = mask.astype(jnp.float32)
    x = jnp.where(mask, per_token, 0.0)
    if mode == "token_mean":
        den = jnp.sum(m) if denominator is None else denominator
        return jnp.sum(x) / jnp.maximum(den, 1.0)
    n_seg = _num_segments(mask, segment_ids) if denominator is None else denominator
    n_seg = jnp.maximum(n_seg, 1.0)
    if mode == "seq_mean_token_sum_norm":
        if not norm_length:
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs norm_length > 0")
        return jnp.sum(x) / (n_seg * norm_length)
    sums = segment_sum(x, segment_ids)[:, 1:]
    if mode == "seq_mean_token_sum":
        return jnp.sum(sums) / n_seg
    if mode == "seq_mean_token_mean":
        counts = segment_sum(m, segment_ids)[:, 1:]
        return jnp.sum(sums / jnp.maximum(counts, 1.0)) / n_seg
    raise ValueError(f"unknown aggregation {mode!r}; valid: {AGGREGATIONS}")


def tis_weights(
    old_logprobs: Array,
    behaviour_logprobs: Array,
    mask: Array,
    segment_ids: Array,
    params: TISParams,
) -> tuple[Array, dict[str, Array]]:
    """Stop-gradient TIS weights per token ``[rows, L]`` and their metrics.

    Returns weights of 1 everywhere when ``params.mode == "none"``.
    """
    log_w = jnp.where(mask, old_logprobs - behaviour_logprobs, 0.0)
    if params.level == "sequence":
        log_w = gather_segments(segment_sum(log_w, segment_ids), segment_ids)
    elif params.level == "geometric":
        log_w = segment_mean_tokens(log_w, mask, segment_ids)
    log_w = sg(jnp.where(mask, log_w, 0.0))
    raw = jnp.exp(jnp.clip(log_w, -30.0, 30.0))
    log_cap = math.log(params.cap)
    if params.mode == "truncate":
        w = jnp.exp(jnp.minimum(log_w, log_cap))
    elif params.mode == "mask":
        w = jnp.where(log_w <= log_cap, raw, 0.0)
    else:
        w = jnp.ones_like(raw)
    metrics = {
        "is_weight_mean": masked_mean(raw, mask),
        "is_weight_max": masked_max(raw, mask),
        "is_weight_min": masked_min(raw, mask),
        "is_clip_frac": masked_mean((log_w > log_cap).astype(jnp.float32), mask),
    }
    return w, metrics


# ---------------------------------------------------------------------------------------------
# Surrogates: fn(log_ratio, logprobs, advantages, mask, segment_ids, params)
#   -> (per-token loss [rows, L], {"clipped": bool [rows, L], ...})
# ---------------------------------------------------------------------------------------------


def ppo_surrogate(log_ratio, logprobs, advantages, mask, segment_ids, params: PPOParams):
    """Clipped surrogate (Schulman et al., 2017, "Proximal Policy Optimization Algorithms").

    ``l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)``. With dual clip
    (Ye et al., 2020, "Mastering Complex Control in MOBA Games with Deep RL"), for ``A_t < 0``:
    ``l_t = min(l_t, -c A_t)``, bounding the loss of tokens whose ratio has grown very large.
    The gradient is exactly zero where a clip is active.
    """
    del logprobs, segment_ids
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    loss = jnp.maximum(unclipped, clipped)
    aux = {"clipped": (clipped > unclipped) & mask}
    if params.dual_clip is not None:
        bound = -params.dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = jnp.where(dual, bound, loss)
        aux["dual_clipped"] = dual & mask
    return loss, aux


def _weighted_logprob(weight, logprobs, advantages):
    # Gradient -w A grad(log pi); written with exp(lp - sg(lp)) (== 1) so the loss *value* is
    # the surrogate's value -w A rather than an arbitrary multiple of log pi.
    return -sg(weight) * advantages * jnp.exp(logprobs - sg(logprobs))


def cispo_surrogate(log_ratio, logprobs, advantages, mask, segment_ids, params: CISPOParams):
    """CISPO (MiniMax, 2025, "MiniMax-M1", arXiv:2506.13585, eq. 4).

    ``l_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * log pi_theta(y_t)``: the
    importance weight is clipped and stopped, the log-prob keeps its gradient, so no token's
    update is dropped (unlike PPO, whose clip zeroes the gradient).
    """
    del segment_ids
    ratio = jnp.exp(log_ratio)
    w = jnp.clip(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    aux = {"clipped": (w != ratio) & mask}
    return _weighted_logprob(w, logprobs, advantages), aux


def is_surrogate(log_ratio, logprobs, advantages, mask, segment_ids, params: ISParams):
    """Importance-sampled policy gradient with truncated weights.

    ``l_t = -sg(min(r_t, max_weight)) * A_t * log pi_theta(y_t)``: the off-policy policy
    gradient (Degris et al., 2012) with the truncation of Espeholt et al., 2018 (IMPALA's
    ``rho_bar``) for bounded variance.
    """
    del segment_ids
    ratio = jnp.exp(log_ratio)
    w = jnp.minimum(ratio, params.max_weight)
    aux = {"clipped": (ratio > params.max_weight) & mask}
    return _weighted_logprob(w, logprobs, advantages), aux


def gspo_surrogate(log_ratio, logprobs, advantages, mask, segment_ids, params: GSPOParams):
    """GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization", arXiv:2507.18071).

    Sequence ratio ``s_i = exp(mean_{t in i} log r_t)`` over the loss tokens of segment ``i``;
    GSPO-token form ``s_{i,t} = sg(s_i) * pi_theta(y_t) / sg(pi_theta(y_t))`` (value ``s_i``,
    gradient ``s_i grad log pi``), and ``l_t = -min(s_{i,t} A_t, clip(s_{i,t}, 1 - clip_low,
    1 + clip_high) A_t)``. With a sequence-level advantage and ``seq_mean_token_mean``
    aggregation this is the GSPO objective exactly.
    """
    seq_log_ratio = segment_mean_tokens(log_ratio, mask, segment_ids)
    s = jnp.exp(sg(seq_log_ratio) + logprobs - sg(logprobs))
    unclipped = -advantages * s
    clipped = -advantages * jnp.clip(s, 1.0 - params.clip_low, 1.0 + params.clip_high)
    loss = jnp.maximum(unclipped, clipped)
    return loss, {"clipped": (clipped > unclipped) & mask, "seq_ratio": jnp.exp(seq_log_ratio)}


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A registry entry: the per-token surrogate and its parameter dataclass."""

    surrogate: Callable[..., tuple[Array, dict[str, Array]]]
    params_cls: type


POLICY_LOSSES: Registry[PolicyLoss] = Registry("loss")
POLICY_LOSSES.register("ppo", PolicyLoss(ppo_surrogate, PPOParams))
POLICY_LOSSES.register("cispo", PolicyLoss(cispo_surrogate, CISPOParams))
POLICY_LOSSES.register("is", PolicyLoss(is_surrogate, ISParams))
POLICY_LOSSES.register("gspo", PolicyLoss(gspo_surrogate, GSPOParams))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def _validate_inputs(where: str, inputs: PolicyLossInputs, config: LossConfig) -> None:
    v.check_rank(where, "logprobs", inputs.logprobs, 2)
    v.check_same_shape(
        where,
        "logprobs",
        inputs.logprobs,
        old_logprobs=inputs.old_logprobs,
        advantages=inputs.advantages,
        loss_mask=inputs.loss_mask,
        segment_ids=inputs.segment_ids,
        behaviour_logprobs=inputs.behaviour_logprobs,
        ref_logprobs=inputs.ref_logprobs,
        entropy=inputs.entropy,
    )
    v.check_floating(
        where,
        logprobs=inputs.logprobs,
        old_logprobs=inputs.old_logprobs,
        advantages=inputs.advantages,
        behaviour_logprobs=inputs.behaviour_logprobs,
        ref_logprobs=inputs.ref_logprobs,
        entropy=inputs.entropy,
    )
    v.check_integer(where, segment_ids=inputs.segment_ids)
    if config.tis.mode != "none" and inputs.behaviour_logprobs is None:
        raise ValueError(f"{where}: tis.mode={config.tis.mode!r} needs 'behaviour_logprobs'")
    if config.kl_coef > 0 and inputs.ref_logprobs is None:
        raise ValueError(f"{where}: kl_coef={config.kl_coef} needs 'ref_logprobs'")
    if config.entropy_coef > 0 and inputs.entropy is None:
        raise ValueError(
            f"{where}: entropy_coef={config.entropy_coef} needs a per-token 'entropy' input"
        )


def policy_loss(
    name: str,
    inputs: PolicyLossInputs,
    params: Any | None = None,
    config: LossConfig = LossConfig(),
    *,
    denominator: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The policy loss ``name`` (``ppo``, ``cispo``, ``is``, ``gspo``) over packed rows.

    Args:
      name: a key of :data:`POLICY_LOSSES` (static under jit).
      inputs: :class:`PolicyLossInputs`, every array ``[rows, L]``.
      params: the loss's parameter dataclass (defaults when ``None``).
      config: :class:`LossConfig` (aggregation, KL, entropy, TIS).
      denominator: optional global token/segment count for :func:`aggregate`.

    Returns:
      ``(loss, metrics)``: a scalar f32 loss to minimise, and scalar metrics: ``pg_loss``,
      ``kl``, ``kl_loss``, ``entropy`` (exact when ``inputs.entropy`` is given, else the
      sampled-token estimate ``mean(-logprobs)``), ``clip_frac``, ``ratio_mean/min/max``,
      ``approx_kl`` (k3 of pi_old vs pi_theta), ``is_weight_mean/max/min``, ``is_clip_frac``,
      ``num_tokens``, and loss-specific ones (``dual_clip_frac``, ``seq_ratio_mean``).
    """
    entry = POLICY_LOSSES.get(name)
    params = entry.params_cls() if params is None else params
    if not isinstance(params, entry.params_cls):
        raise TypeError(
            f"loss {name!r} takes params of type {entry.params_cls.__name__}, "
            f"got {type(params).__name__}"
        )
    _validate_inputs(name, inputs, config)

    mask = inputs.loss_mask.astype(bool) & (inputs.segment_ids > 0)
    f32 = lambda x: None if x is None else jnp.where(mask, x.astype(jnp.float32), 0.0)
    logp = f32(inputs.logprobs)
    old = sg(f32(inputs.old_logprobs))
    adv = sg(f32(inputs.advantages))
    seg = inputs.segment_ids

    log_ratio = logp - old
    per_token, aux = entry.surrogate(log_ratio, logp, adv, mask, seg, params)

    metrics: dict[str, Array] = {}
    if inputs.behaviour_logprobs is not None:
        w, tis_metrics = tis_weights(old, sg(f32(inputs.behaviour_logprobs)), mask, seg, config.tis)
        metrics.update(tis_metrics)
        per_token = per_token * w
    pg_loss = aggregate(per_token, mask, seg, config.aggregation,
                        norm_length=config.norm_length, denominator=denominator)
    total = per_token

    if inputs.ref_logprobs is not None:
        kl_tok = kl_estimate(logp, sg(f32(inputs.ref_logprobs)), config.kl_estimator)
        metrics["kl"] = masked_mean(kl_tok, mask)
        if config.kl_coef > 0:
            total = total + config.kl_coef * kl_tok
            metrics["kl_loss"] = config.kl_coef * aggregate(
                kl_tok, mask, seg, config.aggregation,
                norm_length=config.norm_length, denominator=denominator)
    if inputs.entropy is not None:
        ent = f32(inputs.entropy)
        metrics["entropy"] = masked_mean(ent, mask)
        if config.entropy_coef > 0:
            total = total - config.entropy_coef * ent
    else:
        metrics["entropy"] = masked_mean(-logp, mask)

    loss = aggregate(total, mask, seg, config.aggregation,
                     norm_length=config.norm_length, denominator=denominator)

    ratio = jnp.exp(log_ratio)
    metrics.update(
        pg_loss=pg_loss,
        clip_frac=masked_mean(aux["clipped"].astype(jnp.float32), mask),
        ratio_mean=masked_mean(ratio, mask),
        ratio_min=masked_min(ratio, mask),
        ratio_max=masked_max(ratio, mask),
        approx_kl=masked_mean(kl_estimate(logp, old, "k3"), mask),
        num_tokens=jnp.sum(mask.astype(jnp.float32)),
    )
    if "dual_clipped" in aux:
        metrics["dual_clip_frac"] = masked_mean(aux["dual_clipped"].astype(jnp.float32), mask)
    if "seq_ratio" in aux:
        metrics["seq_ratio_mean"] = masked_mean(aux["seq_ratio"], mask)
    metrics = {k: sg(val).astype(jnp.float32) for k, val in metrics.items()}
    return loss, metrics
