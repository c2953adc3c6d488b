"""Group-based advantage estimators, chosen by name (``advantage_method`` in recipes).

Inputs are rewards grouped per prompt: ``rewards: [G, n]`` (``G`` groups of ``n`` samples of the
same task), with an optional ``valid: [G, n] bool`` marking the samples that exist (a dropped
rollout is ``False``; it gets advantage 0 and is left out of every baseline). The per-turn
estimator takes ``turn_rewards: [G, n, T]`` and ``valid: [G, n, T]`` instead.

Every estimator is a pure function of arrays and small frozen parameter dataclasses, works under
``jax.jit`` and ``jax.vmap``, and checks shapes at entry (at trace time).

Names (``ADVANTAGE_ESTIMATORS``):

===========================  ==================================================================
``group_based``               GRPO: ``(r - mean_g) / (std_g + eps)``; ``normalize_by_std=False``
                              is Dr. GRPO's ``r - mean_g``.
``rloo``                      REINFORCE leave-one-out: ``r_i - mean_{j != i} r_j``.
``grpo_passk``                Pass@k training, analytic advantage (Chen et al., 2025), in its
                              max@k form for non-binary rewards.
``group_based_per_turn``      per-turn reward-to-go against the group's mean at the same turn.
``reinforce_pp_baseline``     REINFORCE++-baseline: group mean subtracted, then batch whitening.
``opo``                       On-Policy RL with Optimal reward baseline: length-weighted mean.
===========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.kernels import _validate as v
from mtrl_jax.kernels.registry import Registry

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupBasedParams:
    """``group_based`` (GRPO / Dr. GRPO).

    Attributes:
      normalize_by_std: divide by the group std (GRPO). ``False`` gives Dr. GRPO (Liu et al.,
        2025, "Understanding R1-Zero-Like Training"), which drops the std to remove the bias
        towards groups that are almost all right or all wrong.
      std_ddof: 1 = unbiased sample std (what TRL and verl compute), 0 = population std.
      eps: added to the std.
    """

    normalize_by_std: bool = True
    std_ddof: int = 1
    eps: float = 1e-6

    def __post_init__(self):
        if self.std_ddof not in (0, 1):
            raise ValueError(f"std_ddof must be 0 or 1, got {self.std_ddof}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


@dataclasses.dataclass(frozen=True)
class RLOOParams:
    """``rloo`` has no hyper-parameters."""


@dataclasses.dataclass(frozen=True)
class PassKParams:
    """``grpo_passk``.

    Attributes:
      k: the k of pass@k being optimised (1 <= k; groups with fewer valid samples use
        ``min(k, n_valid)``). ``k = 1`` reduces to GRPO with the population std.
      normalize_by_std: divide by the std of the group's max@k reward (as in the paper).
      eps: added to the std.
    """

    k: int = 4
    normalize_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"grpo_passk: k must be >= 1, got {self.k}")


@dataclasses.dataclass(frozen=True)
class PerTurnParams:
    """``group_based_per_turn``.

    Attributes:
      gamma: discount of the reward-to-go over turns.
      normalize_by_std: divide by the std of the reward-to-go over the group at that turn.
      std_ddof: as in :class:`GroupBasedParams`.
      eps: added to the std.
    """

    gamma: float = 1.0
    normalize_by_std: bool = True
    std_ddof: int = 1
    eps: float = 1e-6

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"group_based_per_turn: gamma must be in [0, 1], got {self.gamma}")
        if self.std_ddof not in (0, 1):
            raise ValueError(f"std_ddof must be 0 or 1, got {self.std_ddof}")


@dataclasses.dataclass(frozen=True)
class ReinforcePPParams:
    """``reinforce_pp_baseline``: ``eps`` added to the batch std."""

    eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class OPOParams:
    """``opo`` has no hyper-parameters; it needs per-sample ``lengths``."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _prepare(where: str, rewards, valid, rank: int) -> tuple[Array, Array]:
    v.check_rank(where, "rewards", rewards, rank)
    v.check_same_shape(where, "rewards", rewards, valid=valid)
    rewards = jnp.asarray(rewards, jnp.float32)
    valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
    return rewards, valid


def _shift_to_min(x: Array, valid: Array, axis: int) -> Array:
    """``x - min(x)`` over ``axis`` among valid entries (0 elsewhere).

    Every estimator here is invariant to adding a constant within a group, so this changes
    nothing mathematically; it makes a group of equal rewards exactly zero in floating point
    (``0.7 - mean([0.7] * 6)`` is not 0 in f32, and divided by ``std + eps`` it is not small).
    """
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis, keepdims=True)
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    return jnp.where(valid, x - lo, 0.0)


def _group_relative(x: Array, valid: Array, normalize: bool, ddof: int, eps: float) -> Array:
    """``(x - mean_g) [/ (std_g + eps)]`` over axis 1 (the group), 0 where not valid."""
    x = _shift_to_min(x, valid, axis=1)
    mean, std, _ = _masked_moments(x, valid, axis=1, ddof=ddof)
    adv = x - mean
    if normalize:
        adv = adv / (std + eps)
    return jnp.where(valid, adv, 0.0)


def _masked_moments(x: Array, valid: Array, axis: int, ddof: int) -> tuple[Array, Array, Array]:
    """Mean, std and count of ``x`` over ``axis`` restricted to ``valid`` (keepdims)."""
    m = valid.astype(jnp.float32)
    count = jnp.sum(m, axis=axis, keepdims=True)
    mean = jnp.sum(jnp.where(valid, x, 0.0), axis=axis, keepdims=True) / jnp.maximum(count, 1.0)
    sq = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0), axis=axis, keepdims=True)
    std = jnp.sqrt(sq / jnp.maximum(count - ddof, 1.0))
    return mean, std, count


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------


def group_based_advantages(
    rewards: Array,
    valid: Array | None = None,
    *,
    params: GroupBasedParams = GroupBasedParams(),
) -> Array:
    """GRPO group-relative advantage.

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` over the valid samples of the group
    (Shao et al., 2024, "DeepSeekMath", eq. for outcome supervision). With
    ``normalize_by_std=False``: ``A_i = r_i - mean_g(r)`` (Dr. GRPO, Liu et al., 2025).

    Args:
      rewards: ``[G, n] f32``.
      valid: optional ``[G, n] bool``.
      params: :class:`GroupBasedParams`.

    Returns:
      ``[G, n] f32``; 0 for invalid samples and for groups whose rewards are all equal.
    """
    rewards, valid = _prepare("group_based", rewards, valid, 2)
    return _group_relative(rewards, valid, params.normalize_by_std, params.std_ddof, params.eps)


def rloo_advantages(
    rewards: Array, valid: Array | None = None, *, params: RLOOParams = RLOOParams()
) -> Array:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics").

    ``A_i = r_i - (1 / (m - 1)) * sum_{j != i} r_j`` over the ``m`` valid samples of the group,
    which equals ``m / (m - 1) * (r_i - mean_g(r))``. Groups with fewer than 2 valid samples get 0.

    Args:
      rewards: ``[G, n] f32``; valid: optional ``[G, n] bool``.

    Returns:
      ``[G, n] f32``.
    """
    del params
    rewards, valid = _prepare("rloo", rewards, valid, 2)
    rewards = _shift_to_min(rewards, valid, axis=1)
    m = valid.astype(jnp.float32)
    count = jnp.sum(m, axis=1, keepdims=True)
    total = jnp.sum(rewards * m, axis=1, keepdims=True)
    baseline = (total - rewards) / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(valid & (count > 1), rewards - baseline, 0.0)


def grpo_passk_advantages(
    rewards: Array, valid: Array | None = None, *, params: PassKParams = PassKParams()
) -> Array:
    """Pass@k training advantage, analytic form (Chen et al., 2025, "Pass@k Training for
    Adaptively Balancing Exploration and Exploitation of Large Reasoning Models",
    arXiv:2508.10751, Sec. "Analytical Derivation").

    The group of ``n`` samples is (conceptually) split into all ``C(n, k)`` subsets of size
    ``k``; a subset's reward is its best member's reward (pass@k for 0/1 rewards, max@k
    otherwise). A sample's advantage is the expected normalised subset advantage over the
    subsets that contain it. With rewards sorted ascending ``r_(1) <= ... <= r_(n)``:

    - ``P(max = r_(j)) = C(j-1, k-1) / C(n, k)``; ``mu = sum_j r_(j) P_j``,
      ``sigma^2 = sum_j r_(j)^2 P_j - mu^2``.
    - For the sample of rank ``p``: ``E_p = [r_(p) C(p-1, k-1) + sum_{j>p} r_(j) C(j-2, k-2)]
      / C(n-1, k-1)``, and ``A_p = (E_p - mu) / (sigma + eps)``.

    For 0/1 rewards this is exactly the paper's closed form: with ``N_neg`` failures,
    ``mu = 1 - C(N_neg, k)/C(n, k)``, ``A_pos = (1 - mu)/sigma`` and
    ``A_neg = (1 - mu - C(N_neg-1, k-1)/C(n-1, k-1))/sigma``. ``k = 1`` gives GRPO with the
    population std. Ties are harmless: any order of equal rewards gives the same values.

    Args:
      rewards: ``[G, n] f32``; valid: optional ``[G, n] bool``.
      params: :class:`PassKParams`.

    Returns:
      ``[G, n] f32``.
    """
    rewards, valid = _prepare("grpo_passk", rewards, valid, 2)
    n_slots = rewards.shape[1]
    count = jnp.sum(valid, axis=1).astype(jnp.int32)  # [G]
    p_table, own_table, above_table = _passk_tables(n_slots, params.k)

    # Sort each group ascending with invalid samples first, so that the valid samples take the
    # last `count` slots; shift by the group minimum so an all-equal group is exactly zero.
    shifted = _shift_to_min(rewards, valid, axis=1)
    order = jnp.argsort(jnp.where(valid, shifted, -1.0), axis=1, stable=True)
    r_sorted = jnp.take_along_axis(shifted, order, axis=1)
    # Row `count` of each table holds the weights by slot for a group of `count` valid samples.
    p_max = jnp.asarray(p_table)[count]
    own = jnp.asarray(own_table)[count]
    w_above = jnp.asarray(above_table)[count]

    mu = jnp.sum(p_max * r_sorted, axis=1, keepdims=True)
    second = jnp.sum(p_max * r_sorted**2, axis=1, keepdims=True)
    sigma = jnp.sqrt(jnp.maximum(second - mu**2, 0.0))
    contrib = r_sorted * w_above
    # suffix[p] = sum_{j > p} contrib[j]
    suffix = jnp.flip(jnp.cumsum(jnp.flip(contrib, axis=1), axis=1), axis=1) - contrib
    adv_sorted = r_sorted * own + suffix - mu
    if params.normalize_by_std:
        adv_sorted = adv_sorted / (sigma + params.eps)
    inverse = jnp.argsort(order, axis=1)
    adv = jnp.take_along_axis(adv_sorted, inverse, axis=1)
    return jnp.where(valid, adv, 0.0)


@functools.lru_cache(maxsize=64)
def _passk_tables(n_slots: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binomial weights of :func:`grpo_passk_advantages`, in float64 then rounded to f32.

    For each valid count ``m`` (row) and slot ``s`` (column; the valid samples fill the last
    ``m`` slots, so rank ``p = s + 1 - (n_slots - m)``), with ``k' = min(k, m)``:
    ``P[m, s] = C(p-1, k'-1)/C(m, k')``, ``OWN[m, s] = C(p-1, k'-1)/C(m-1, k'-1)``,
    ``ABOVE[m, s] = C(p-2, k'-2)/C(m-1, k'-1)``. Built once per (n_slots, k) at trace time.
    """

    def log_comb(a: int, b: int) -> float:
        if b < 0 or b > a or a < 0:
            return -math.inf
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    tables = np.zeros((3, n_slots + 1, n_slots), np.float64)
    for m in range(1, n_slots + 1):
        kk = min(k, m)
        for s in range(n_slots):
            p = s + 1 - (n_slots - m)
            if p < 1:
                continue
            tables[0, m, s] = math.exp(log_comb(p - 1, kk - 1) - log_comb(m, kk))
            tables[1, m, s] = math.exp(log_comb(p - 1, kk - 1) - log_comb(m - 1, kk - 1))
            tables[2, m, s] = math.exp(log_comb(p - 2, kk - 2) - log_comb(m - 1, kk - 1))
    t = tables.astype(np.float32)
    return t[0], t[1], t[2]


def per_turn_advantages(
    turn_rewards: Array, valid: Array | None = None, *, params: PerTurnParams = PerTurnParams()
) -> Array:
    """Per-turn advantage from reward-to-go against a group baseline at the same turn.

    Definition. For sample ``i`` of a group with per-turn rewards ``r_{i,t}`` on its turns
    ``t = 0 .. T_i - 1`` (``valid[g, i, t]``), the reward-to-go is
    ``G_{i,t} = sum_{t' >= t} gamma^(t' - t) r_{i,t'}``. The baseline at turn ``t`` is the mean
    of ``G_{j,t}`` over the group's samples ``j`` that *have* a turn ``t``, and

    ``A_{i,t} = (G_{i,t} - mean_{j: t < T_j} G_{j,t}) / (std_{j: t < T_j} G_{j,t} + eps)``

    (no division with ``normalize_by_std=False``). With a single terminal reward, turn 0 gives
    the GRPO advantage of the return; later turns are compared only against samples that got
    that far.

    Known bias. When the policy decides when to stop (emit the final answer), the set of
    samples compared at turn ``t`` is chosen by the policy itself: the baseline at a late turn
    is the mean over the survivors, so it depends on the sample's own earlier actions and is no
    longer action-independent. A policy can shift late-turn advantages by stopping early on hard
    cases (survivorship), and the baseline compares states that differ across samples (turn
    ``t`` of two episodes is not the same state). The estimator is therefore biased as a policy
    gradient; it is a variance-reduction heuristic that credits turns, not an unbiased
    estimator. The baseline also includes the sample itself, which shrinks advantages by
    ``(m - 1)/m`` as in GRPO. Prefer ``group_based`` (whole-episode advantage) unless per-turn
    rewards carry real information about intermediate turns.

    Args:
      turn_rewards: ``[G, n, T] f32`` reward received at each turn (0 where none).
      valid: optional ``[G, n, T] bool``; ``True`` for turns that happened.
      params: :class:`PerTurnParams`.

    Returns:
      ``[G, n, T] f32``; 0 on turns that did not happen.
    """
    rewards, valid = _prepare("group_based_per_turn", turn_rewards, valid, 3)
    r = jnp.where(valid, rewards, 0.0)
    # to_go[..., t] = sum_{t' >= t} gamma^(t' - t) r[..., t']  ==  r @ D with an upper-
    # triangular discount matrix D[t', t] = gamma^(t' - t) for t' >= t.
    t = np.arange(r.shape[2])
    expo = t[:, None] - t[None, :]
    discount = np.where(expo >= 0, float(params.gamma) ** np.maximum(expo, 0), 0.0)
    to_go = jnp.einsum("gnt,ts->gns", r, jnp.asarray(discount, jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return _group_relative(to_go, valid, params.normalize_by_std, params.std_ddof, params.eps)


def reinforce_pp_baseline_advantages(
    rewards: Array, valid: Array | None = None, *, params: ReinforcePPParams = ReinforcePPParams()
) -> Array:
    """REINFORCE++-baseline (Hu et al., 2025, "REINFORCE++", arXiv:2501.03262).

    The group mean is the baseline; the result is whitened over the whole batch instead of per
    group: ``a_i = r_i - mean_g(r)``, ``A_i = (a_i - mean_batch(a)) / (std_batch(a) + eps)``,
    with population moments over all valid samples of the batch. Per-group std division
    (GRPO) over-weights near-uniform groups; batch whitening keeps the scale without that bias.

    Args:
      rewards: ``[G, n] f32``; valid: optional ``[G, n] bool``.

    Returns:
      ``[G, n] f32``.
    """
    rewards, valid = _prepare("reinforce_pp_baseline", rewards, valid, 2)
    rewards = _shift_to_min(rewards, valid, axis=1)
    mean, _, _ = _masked_moments(rewards, valid, axis=1, ddof=0)
    centred = jnp.where(valid, rewards - mean, 0.0)
    flat_valid = valid.reshape(-1)
    b_mean, b_std, _ = _masked_moments(centred.reshape(-1), flat_valid, axis=0, ddof=0)
    adv = (centred - b_mean) / (b_std + params.eps)
    return jnp.where(valid, adv, 0.0)


def opo_advantages(
    rewards: Array,
    valid: Array | None = None,
    *,
    lengths: Array,
    params: OPOParams = OPOParams(),
) -> Array:
    """OPO: on-policy RL with the optimal reward baseline (Hao et al., 2025, arXiv:2505.23585).

    Under a sequence-level reward and per-token gradients whose squared norm grows with the
    response length, the variance-minimising baseline is the length-weighted mean reward:
    ``b = sum_j l_j r_j / sum_j l_j`` over the group's valid samples; ``A_i = r_i - b``.

    Args:
      rewards: ``[G, n] f32``; valid: optional ``[G, n] bool``.
      lengths: ``[G, n]`` number of policy-sampled tokens of each sample.

    Returns:
      ``[G, n] f32``.
    """
    del params
    rewards, valid = _prepare("opo", rewards, valid, 2)
    rewards = _shift_to_min(rewards, valid, axis=1)
    v.check_same_shape("opo", "rewards", rewards, lengths=lengths)
    w = jnp.where(valid, jnp.asarray(lengths, jnp.float32), 0.0)
    baseline = jnp.sum(w * rewards, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(w, axis=1, keepdims=True), 1e-9
    )
    return jnp.where(valid, rewards - baseline, 0.0)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """A registry entry.

    Attributes:
      fn: ``fn(rewards, valid=None, *, params, [lengths])``.
      params_cls: the frozen dataclass of its hyper-parameters.
      level: ``"sequence"`` (output ``[G, n]``) or ``"turn"`` (output ``[G, n, T]``).
      needs_lengths: whether ``lengths`` must be passed.
      extra_inputs: names of further inputs it reads (a caller that cannot feed them refuses
        the estimator up front; see :attr:`inputs`).
    """

    fn: Callable[..., Array]
    params_cls: type
    level: Literal["sequence", "turn"] = "sequence"
    needs_lengths: bool = False
    extra_inputs: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the estimator reads: ``rewards`` ``[G, n]`` or ``turn_rewards`` ``[G, n, T]``,
        ``lengths`` when it needs them, and any ``extra_inputs``."""
        base = ("turn_rewards",) if self.level == "turn" else ("rewards",)
        return base + (("lengths",) if self.needs_lengths else ()) + self.extra_inputs


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage_method")
ADVANTAGE_ESTIMATORS.register(
    "group_based", AdvantageEstimator(group_based_advantages, GroupBasedParams)
)
ADVANTAGE_ESTIMATORS.register("rloo", AdvantageEstimator(rloo_advantages, RLOOParams))
ADVANTAGE_ESTIMATORS.register("grpo_passk", AdvantageEstimator(grpo_passk_advantages, PassKParams))
ADVANTAGE_ESTIMATORS.register(
    "group_based_per_turn", AdvantageEstimator(per_turn_advantages, PerTurnParams, level="turn")
)
ADVANTAGE_ESTIMATORS.register(
    "reinforce_pp_baseline",
    AdvantageEstimator(reinforce_pp_baseline_advantages, ReinforcePPParams),
)
ADVANTAGE_ESTIMATORS.register(
    "opo", AdvantageEstimator(opo_advantages, OPOParams, needs_lengths=True)
)


def compute_advantages(
    method: str,
    rewards: Array,
    valid: Array | None = None,
    *,
    params: Any | None = None,
    lengths: Array | None = None,
) -> Array:
    """Look up ``method`` in :data:`ADVANTAGE_ESTIMATORS` and apply it.

    ``params`` defaults to the estimator's parameter dataclass with its defaults; passing the
    wrong dataclass type fails with the expected one named.
    """
    est = ADVANTAGE_ESTIMATORS.get(method)
    if params is None:
        params = est.params_cls()
    elif not isinstance(params, est.params_cls):
        raise TypeError(
            f"advantage_method {method!r} takes params of type {est.params_cls.__name__}, "
            f"got {type(params).__name__}"
        )
    if est.needs_lengths:
        if lengths is None:
            raise ValueError(f"advantage_method {method!r} needs 'lengths' [G, n]")
        return est.fn(rewards, valid, lengths=lengths, params=params)
    return est.fn(rewards, valid, params=params)


def group_diagnostics(
    rewards: Array,
    advantages: Array,
    valid: Array | None = None,
    *,
    atol: float = 1e-6,
) -> dict[str, Array]:
    """Learning-signal diagnostics of a batch of groups.

    Args:
      rewards: ``[G, n]`` sequence-level rewards.
      advantages: ``[G, n]`` or ``[G, n, T]`` (per-turn) advantages of the same batch.
      valid: optional ``[G, n] bool``.
      atol: an advantage with ``|A| <= atol`` counts as zero.

    Returns:
      ``analysis/zero_adv_groups``: fraction of groups (with at least one valid sample) whose
      advantages are all zero -- they contribute no gradient.
      ``rollout/reward/valid_mean``: mean reward over the valid samples of the groups with a
      non-zero advantage (NaN when there is none).
    """
    where = "group_diagnostics"
    rewards, valid = _prepare(where, rewards, valid, 2)
    v.check_rank(where, "advantages", advantages, (2, 3))
    if tuple(advantages.shape[:2]) != tuple(rewards.shape):
        raise ValueError(
            f"{where}: 'advantages' has shape {tuple(advantages.shape)} but 'rewards' has "
            f"shape {tuple(rewards.shape)}: the leading [G, n] must match"
        )
    mag = jnp.abs(advantages)
    if mag.ndim == 3:
        mag = jnp.max(mag, axis=2)
    group_has = jnp.any(valid, axis=1)
    nonzero = jnp.any(valid & (mag > atol), axis=1)
    n_groups = jnp.sum(group_has)
    zero_frac = jnp.sum(group_has & ~nonzero) / jnp.maximum(n_groups, 1)
    sel = valid & nonzero[:, None]
    n_sel = jnp.sum(sel)
    valid_mean = jnp.where(
        n_sel > 0, jnp.sum(jnp.where(sel, rewards, 0.0)) / jnp.maximum(n_sel, 1), jnp.nan
    )
    return {
        "analysis/zero_adv_groups": zero_frac.astype(jnp.float32),
        "rollout/reward/valid_mean": valid_mean.astype(jnp.float32),
    }
