"""A plain numpy reference of the kernels, written independently with explicit loops.

It computes in float64, walks segments one by one and derives gradients analytically, so that
it shares no code (and few habits) with the vectorised JAX kernels it checks.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

# ------------------------------------------------------------------------------- advantages


def group_based(rewards, valid=None, normalize=True, ddof=1, eps=1e-6):
    rewards = np.asarray(rewards, np.float64)
    valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        idx = np.flatnonzero(valid[g])
        if idx.size == 0:
            continue
        r = rewards[g, idx]
        mean = r.mean()
        std = math.sqrt(((r - mean) ** 2).sum() / max(idx.size - ddof, 1))
        a = r - mean
        if normalize:
            a = a / (std + eps)
        out[g, idx] = a
    return out


def rloo(rewards, valid=None):
    rewards = np.asarray(rewards, np.float64)
    valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        idx = list(np.flatnonzero(valid[g]))
        if len(idx) < 2:
            continue
        for i in idx:
            others = [rewards[g, j] for j in idx if j != i]
            out[g, i] = rewards[g, i] - sum(others) / len(others)
    return out


def passk_bruteforce(rewards, valid=None, k=4, normalize=True, eps=1e-6):
    """Enumerates every k-subset of each group (the definition, not the closed form)."""
    rewards = np.asarray(rewards, np.float64)
    valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        idx = list(np.flatnonzero(valid[g]))
        if not idx:
            continue
        kk = min(k, len(idx))
        subsets = list(itertools.combinations(idx, kk))
        values = np.array([max(rewards[g, j] for j in s) for s in subsets])
        mu = values.mean()
        sigma = values.std()
        for i in idx:
            mine = [val for s, val in zip(subsets, values, strict=True) if i in s]
            a = np.mean(mine) - mu
            out[g, i] = a / (sigma + eps) if normalize else a
    return out


def per_turn(turn_rewards, valid, gamma=1.0, normalize=True, ddof=1, eps=1e-6):
    r = np.asarray(turn_rewards, np.float64)
    valid = np.asarray(valid, bool)
    G, n, T = r.shape
    to_go = np.zeros_like(r)
    for g in range(G):
        for i in range(n):
            acc = 0.0
            for t in reversed(range(T)):
                acc = (r[g, i, t] if valid[g, i, t] else 0.0) + gamma * acc
                to_go[g, i, t] = acc
    out = np.zeros_like(r)
    for g in range(G):
        for t in range(T):
            idx = [i for i in range(n) if valid[g, i, t]]
            if not idx:
                continue
            vals = np.array([to_go[g, i, t] for i in idx])
            mean = vals.mean()
            std = math.sqrt(((vals - mean) ** 2).sum() / max(len(idx) - ddof, 1))
            for i in idx:
                a = to_go[g, i, t] - mean
                out[g, i, t] = a / (std + eps) if normalize else a
    return out


def reinforce_pp(rewards, valid=None, eps=1e-6):
    rewards = np.asarray(rewards, np.float64)
    valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)
    centred = {}
    for g in range(rewards.shape[0]):
        idx = np.flatnonzero(valid[g])
        if idx.size:
            m = rewards[g, idx].mean()
            for i in idx:
                centred[(g, i)] = rewards[g, i] - m
    vals = np.array(list(centred.values()))
    out = np.zeros_like(rewards)
    if vals.size:
        mean, std = vals.mean(), vals.std()
        for (g, i), a in centred.items():
            out[g, i] = (a - mean) / (std + eps)
    return out


def opo(rewards, lengths, valid=None):
    rewards = np.asarray(rewards, np.float64)
    valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        idx = np.flatnonzero(valid[g])
        if idx.size == 0:
            continue
        w = np.asarray(lengths, np.float64)[g, idx]
        b = (w * rewards[g, idx]).sum() / max(w.sum(), 1e-9)
        out[g, idx] = rewards[g, idx] - b
    return out


# ------------------------------------------------------------------------------- losses


def segments_of(seg_row, mask_row):
    """{segment id: [token positions with a loss]} for one row (ids > 0 only)."""
    out: dict[int, list[int]] = {}
    for t, (s, m) in enumerate(zip(seg_row, mask_row, strict=True)):
        if s > 0 and m:
            out.setdefault(int(s), []).append(t)
    return out


def policy_loss(
    name,
    logp,
    old,
    adv,
    loss_mask,
    seg,
    *,
    params=None,
    aggregation="token_mean",
    norm_length=None,
    kl_coef=0.0,
    kl_estimator="k3",
    ref=None,
    behaviour=None,
    tis_mode="none",
    tis_level="token",
    tis_cap=2.0,
):
    """Returns ``(loss, dloss/dlogp)`` in float64 via per-token analytic derivatives."""
    params = params or {}
    logp = np.asarray(logp, np.float64)
    rows, L = logp.shape
    mask = np.asarray(loss_mask, bool) & (np.asarray(seg) > 0)
    per = np.zeros((rows, L))
    dper = np.zeros((rows, L))  # d per_token / d logp at the same token

    for r in range(rows):
        for toks in segments_of(seg[r], mask[r]).values():
            lr = {t: logp[r, t] - old[r, t] for t in toks}
            if name == "gspo":
                s_seq = math.exp(sum(lr.values()) / len(toks))
            for t in toks:
                a = adv[r, t]
                if name == "ppo":
                    lo, hi = 1 - params.get("clip_low", 0.2), 1 + params.get("clip_high", 0.2)
                    ratio = math.exp(lr[t])
                    un, cl = -a * ratio, -a * min(max(ratio, lo), hi)
                    if cl > un:
                        val, d = cl, 0.0
                    else:
                        val, d = un, -a * ratio
                    c = params.get("dual_clip")
                    if c is not None and a < 0 and val > -c * a:
                        val, d = -c * a, 0.0
                elif name in ("cispo", "is"):
                    ratio = math.exp(lr[t])
                    if name == "cispo":
                        lo = 1 - params.get("clip_low", 1.0)
                        hi = 1 + params.get("clip_high", 0.28)
                        w = min(max(ratio, lo), hi)
                    else:
                        w = min(ratio, params.get("max_weight", 2.0))
                    val, d = -w * a, -w * a
                elif name == "gspo":
                    lo = 1 - params.get("clip_low", 3e-4)
                    hi = 1 + params.get("clip_high", 4e-4)
                    un, cl = -a * s_seq, -a * min(max(s_seq, lo), hi)
                    val, d = (cl, 0.0) if cl > un else (un, -a * s_seq)
                else:
                    raise ValueError(name)
                per[r, t], dper[r, t] = val, d

            if tis_mode != "none":
                lw = {t: old[r, t] - behaviour[r, t] for t in toks}
                if tis_level == "sequence":
                    lw = dict.fromkeys(toks, sum(lw.values()))
                elif tis_level == "geometric":
                    lw = dict.fromkeys(toks, sum(lw.values()) / len(toks))
                for t in toks:
                    w = math.exp(lw[t])
                    if tis_mode == "truncate":
                        w = min(w, tis_cap)
                    elif w > tis_cap:
                        w = 0.0
                    per[r, t] *= w
                    dper[r, t] *= w

            if kl_coef > 0:
                for t in toks:
                    x = ref[r, t] - logp[r, t]
                    if kl_estimator == "k1":
                        k, dk = -x, 1.0
                    elif kl_estimator == "k2":
                        k, dk = 0.5 * x * x, -x
                    else:
                        k, dk = math.exp(x) - 1 - x, 1.0 - math.exp(x)
                    per[r, t] += kl_coef * k
                    dper[r, t] += kl_coef * dk

    # aggregation weights: loss = sum_t c_t * per_t
    coef = np.zeros((rows, L))
    all_segs = [(r, toks) for r in range(rows) for toks in segments_of(seg[r], mask[r]).values()]
    n_tok = int(mask.sum())
    n_seg = len(all_segs)
    for r, toks in all_segs:
        for t in toks:
            if aggregation == "token_mean":
                coef[r, t] = 1.0 / max(n_tok, 1)
            elif aggregation == "seq_mean_token_mean":
                coef[r, t] = 1.0 / (len(toks) * max(n_seg, 1))
            elif aggregation == "seq_mean_token_sum":
                coef[r, t] = 1.0 / max(n_seg, 1)
            elif aggregation == "seq_mean_token_sum_norm":
                coef[r, t] = 1.0 / (max(n_seg, 1) * norm_length)
            else:
                raise ValueError(aggregation)
    return float((coef * per).sum()), coef * dper


# ------------------------------------------------------------------------------- pass@k


def pass_at_k_bruteforce(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def pass_hat_k_bruteforce(n: int, c: int, k: int) -> float:
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(all(samples[i] for i in s) for s in subsets) / len(subsets)
