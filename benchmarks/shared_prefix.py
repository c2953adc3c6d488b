"""A group's shared prompt encoded once vs once per episode, side by side in one run.

    python benchmarks/shared_prefix.py                       # train step and prefill
    python benchmarks/shared_prefix.py --rounds 3 --json experiments/shared_prefix.json
    python benchmarks/shared_prefix.py --small               # a minute: tiny model and lengths

Workload (SOP-length prompts): ``--groups`` groups of ``--group`` episodes; each episode is the
group's prompt (``--prompt`` tokens), then ``--turns`` turns whose sampled spans total
``--resp-lo`` .. ``--resp-hi`` tokens (uniform), with ``--tool`` environment tokens between
turns. Random tokens, seed 0. Model: the peers' 25.3M-parameter Qwen2 layout
(``benchmarks/models.py``), LoRA r16 on every projection, f32.

- ``train``: one LoRA step (PPO loss, token mean; log-probs, backward, AdamW) on the workload
  packed flat (every episode carries its prompt) and packed as trees (the prompt once per row,
  :mod:`mtrl_jax.training.packing`). Both arms use rows of ``--row`` tokens, exactly as many as
  they need (no row-count rounding). Reported: the median step time of each arm over
  ``--rounds`` alternations of ``--iters`` steps, their ratio, the ratio that the two arms'
  FLOP counts predict (matmuls over every computed token, padding included, plus causal
  attention over each row), and the measured share of that predicted speed-up. The gradients of
  both arms are compared (relative error of the whole LoRA gradient).
- ``prefill``: encoding one group's episodes before their first sampled token: ``generate`` on
  ``--group`` fresh slots with the whole prompt each, vs
  :func:`~mtrl_jax.models.decoding.prefill_shared` (the prompt minus its last token, once,
  copied to each slot) then ``generate`` with each slot's last prompt token. One sampled token
  in both arms; the same first token is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import PEER_CONFIG, PEER_LORA

from mtrl_jax.kernels import LossConfig, PolicyLossInputs, PPOParams, policy_loss
from mtrl_jax.models import CausalLM, LoRAConfig, ModelConfig, init_cache, split_lora
from mtrl_jax.models.decoding import SamplingParams, bucket_length, generate, prefill_shared
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.training.lora_step import make_lora_train_step
from mtrl_jax.training.packing import PackedBatch, Segment, pack

SMALL_CONFIG = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, qkv_bias=True, tie_word_embeddings=False)


def workload(rng, *, groups, group, prompt, resp_lo, resp_hi, turns, tool, vocab):
    segs = []
    for g in range(groups):
        p = rng.integers(1, vocab, prompt).astype(np.int32)
        for k in range(group):
            total = int(rng.integers(resp_lo, resp_hi + 1))
            cuts = np.sort(rng.choice(np.arange(1, total), turns - 1, replace=False))
            spans = np.diff(np.r_[0, cuts, total])
            toks, mask = [p], [np.zeros(prompt, np.int8)]
            for t, n in enumerate(spans):
                toks.append(rng.integers(1, vocab, n).astype(np.int32))
                mask.append(np.ones(n, np.int8))
                if t < turns - 1:
                    toks.append(rng.integers(1, vocab, tool).astype(np.int32))
                    mask.append(np.zeros(tool, np.int8))
            toks, mask = np.concatenate(toks), np.concatenate(mask)
            blp = np.where(mask > 0, -2.0, 0.0).astype(np.float32)
            segs.append(Segment(toks, mask, blp, float(rng.normal()), index=g * group + k))
    return segs


def used_rows(b: PackedBatch) -> PackedBatch:
    keep = (b.segment_ids > 0).any(axis=1)
    out = b.rows(slice(None))
    for name in ("tokens", "positions", "segment_ids", "loss_mask", "behaviour_logprobs",
                 "advantages", "segment_index", "parent_ids"):
        setattr(out, name, getattr(b, name)[keep])
    out.flat_tokens = b.flat_tokens
    return out


def train_flops(cfg: ModelConfig, lora_rank: int, rows: int, length: int) -> float:
    """Training FLOPs of a LoRA step over ``rows x length`` computed tokens: forward +
    activation backward of every matmul (frozen weights: no weight gradient) over every computed
    token, LoRA weight gradients, and causal attention (scores and values, forward and backward)
    over each row."""
    tokens = rows * length
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = (cfg.hidden_size * (h + 2 * kv) * d + h * d * cfg.hidden_size
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    linear = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    n_lora = 0
    if lora_rank:
        n_lora = cfg.num_layers * lora_rank * (
            (cfg.hidden_size + h * d) * 2 + (cfg.hidden_size + kv * d) * 2
            + (cfg.hidden_size + cfg.intermediate_size) * 3)
    attn_fwd = cfg.num_layers * rows * 2 * 2 * h * d * length * (length + 1) / 2
    return 4 * linear * tokens + 6 * n_lora * tokens + 3 * attn_fwd


def predicted_flops(b: PackedBatch, cfg: ModelConfig, lora: LoRAConfig) -> float:
    """:func:`train_flops` over ``b``'s rows (padding included)."""
    return train_flops(cfg, lora.rank, *b.shape)


def bench_train(cfg, lora, segs, row, iters, rounds, remat=False):
    model = CausalLM(cfg, lora, rngs=nnx.Rngs(0))
    # LoRA B = 0 at init: give the adapters values so that every gradient is live
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys, strict=True)]))
    graphdef, lora_p, base = split_lora(model)
    arms = {"flat": used_rows(pack(segs, (row,), min_shared=0)),
            "shared": used_rows(pack(segs, (row,), min_shared=16))}

    def loss_fn(m, d):
        lp = token_logprobs(m, d["tokens"], d["positions"], d["segment_ids"],
                            parent_ids=d["parent_ids"], remat=remat).logprobs
        inputs = PolicyLossInputs(lp, jax.lax.stop_gradient(lp), d["advantages"],
                                  d["loss_mask"], d["segment_ids"])
        return policy_loss("ppo", inputs, PPOParams(), LossConfig())[0], {}

    tx = optax.adamw(1e-5)
    out = {}
    grads = {}
    for name, b in arms.items():
        data = {k: jnp.asarray(getattr(b, k)) for k in
                ("tokens", "positions", "segment_ids", "parent_ids", "loss_mask", "advantages")}
        grads[name] = jax.jit(jax.grad(lambda lp, d: loss_fn(nnx.merge(graphdef, lp, base),
                                                             d)[0]))(lora_p, data)
        step = make_lora_train_step(graphdef, tx, loss_fn, donate=False)
        opt = tx.init(lora_p)
        t = time.perf_counter()
        jax.block_until_ready(step(lora_p, opt, base, data)[2])
        out[name] = dict(rows=b.shape[0], row_length=b.shape[1], tokens=b.num_tokens,
                         computed_tokens=b.tokens.size, flat_tokens=b.flat_tokens,
                         compile_s=round(time.perf_counter() - t, 2),
                         flops=predicted_flops(b, cfg, lora), times=[],
                         run=(step, opt, data))
    ga, gb = (jax.tree.leaves(grads[k]) for k in ("flat", "shared"))
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(ga, gb, strict=True))
    den = sum(float(jnp.sum(a ** 2)) for a in ga)
    for _ in range(rounds):  # alternate: slow spells of the machine hit both arms
        for name in arms:
            step, opt, data = out[name]["run"]
            for _ in range(iters):
                t = time.perf_counter()
                jax.block_until_ready(step(lora_p, opt, base, data)[2])
                out[name]["times"].append(time.perf_counter() - t)
    for name in arms:
        del out[name]["run"]
        out[name]["step_s"] = statistics.median(out[name]["times"])
        out[name]["times"] = [round(t, 3) for t in out[name]["times"]]
    measured = out["flat"]["step_s"] / out["shared"]["step_s"]
    predicted = out["flat"]["flops"] / out["shared"]["flops"]
    return dict(arms=out, speedup=measured, predicted_speedup=predicted,
                share_of_predicted=(measured - 1) / max(predicted - 1, 1e-9),
                grad_rel_error=(num / den) ** 0.5)


def bench_prefill(cfg, lora, prompt, group, iters, rounds, seed=0):
    model = CausalLM(cfg, lora, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)
    p = rng.integers(1, cfg.vocab_size, prompt).astype(np.int32)
    max_len = bucket_length(prompt + 16, 256)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    width = bucket_length(prompt, 16)
    flat_in = np.zeros((group, width), np.int32)
    flat_in[:, :prompt] = p
    pre = np.zeros((1, bucket_length(prompt - 1, 16)), np.int32)
    pre[0, :prompt - 1] = p[:-1]
    last = np.zeros((group, 16), np.int32)
    last[:, 0] = p[-1]
    one = jnp.ones((group,), jnp.int32)

    def flat():
        cache = init_cache(cfg, group, max_len)
        o = generate(model, cache, jnp.asarray(flat_in), jnp.full((group,), prompt, jnp.int32),
                     jax.random.key(0), params, max_new=one, max_new_tokens=8)
        return np.asarray(o.tokens[:, 0])

    def shared():
        cache = init_cache(cfg, group, max_len)
        cache = prefill_shared(model, cache, jnp.asarray(pre), jnp.asarray([prompt - 1]),
                               jnp.zeros((group,), jnp.int32), jnp.ones((group,), bool))
        o = generate(model, cache, jnp.asarray(last), one, jax.random.key(0), params,
                     max_new=one, max_new_tokens=8)
        return np.asarray(o.tokens[:, 0])

    arms = {"flat": flat, "shared": shared}
    first = {k: f() for k, f in arms.items()}  # compiles
    assert (first["flat"] == first["shared"]).all(), first
    times = {k: [] for k in arms}
    for _ in range(rounds):
        for k, f in arms.items():
            for _ in range(iters):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(flat_s=med["flat"], shared_s=med["shared"], speedup=med["flat"] / med["shared"],
                times={k: [round(t, 3) for t in v] for k, v in times.items()},
                prompt=prompt, group=group, same_first_tokens=True)


def fingerprint():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    return dict(commit=commit, jax=jax.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                xla_flags=os.environ.get("XLA_FLAGS", ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="train,prefill")
    p.add_argument("--small", action="store_true", help="tiny model and lengths (a smoke run)")
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--resp-lo", type=int, default=256)
    p.add_argument("--resp-hi", type=int, default=1024)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--tool", type=int, default=32)
    p.add_argument("--row", type=int, default=8192)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--remat", action="store_true",
                   help="recompute each layer in the backward (long rows: the attention scores "
                        "of 3 rows of 8,192 tokens x 6 layers need ~40 GB kept)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cfg, lora = PEER_CONFIG, PEER_LORA
    if a.small:
        cfg, lora = SMALL_CONFIG, LoRAConfig(rank=4, alpha=8.0)
        a.prompt, a.resp_lo, a.resp_hi, a.tool, a.row = 96, 16, 48, 4, 512
    segs = workload(np.random.default_rng(0), groups=a.groups, group=a.group, prompt=a.prompt,
                    resp_lo=a.resp_lo, resp_hi=a.resp_hi, turns=a.turns, tool=a.tool,
                    vocab=cfg.vocab_size)
    res = dict(args=vars(a), env=fingerprint(), params=cfg.num_params())
    if "train" in a.only:
        r = bench_train(cfg, lora, segs, a.row, a.iters, a.rounds, a.remat)
        res["train"] = r
        f, s = r["arms"]["flat"], r["arms"]["shared"]
        print(f"train: flat {f['step_s']:.2f} s ({f['rows']} x {f['row_length']}, "
              f"{f['tokens']} tokens) | shared {s['step_s']:.2f} s ({s['rows']} x "
              f"{s['row_length']}, {s['tokens']} tokens) | speed-up {r['speedup']:.2f}x, "
              f"FLOPs predict {r['predicted_speedup']:.2f}x (share of predicted gain "
              f"{r['share_of_predicted']:.0%}) | grad rel. error {r['grad_rel_error']:.1e}",
              flush=True)
    if "prefill" in a.only:
        r = bench_prefill(cfg, lora, a.prompt, a.group, a.iters, a.rounds)
        res["prefill"] = r
        print(f"prefill: {a.group} x {a.prompt} tokens flat {r['flat_s']:.2f} s | shared "
              f"{r['shared_s']:.2f} s | speed-up {r['speedup']:.2f}x", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
