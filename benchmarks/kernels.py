"""Kernel benchmark: policy loss + gradient (w.r.t. the current log-probs) over packed batches.

    python benchmarks/kernels.py                       # 32 x 4096 and 8 x 16384, every loss
    python benchmarks/kernels.py --shapes 32x4096 --losses ppo --repeats 20
    python benchmarks/kernels.py --json experiments/kernels_bench.json

Each case packs episodes of 200..2000 tokens into fixed rows (as sequence extension does),
turns on the full loss (TIS correction, k3 KL penalty, segment-aware aggregation) and reports:
compile time (first call, trace + XLA compile), the median step time of ``--repeats`` calls
after warm-up, and tokens/s = rows * L / step time. The advantage estimators are timed too, on
[num_groups, group_size] rewards. Output: a table on stdout and one JSON record per case.

What the numbers mean: the kernels are element-wise work plus one scatter-add per segment
reduction, so they are memory-bound; on a real step they are dwarfed by the model's forward and
backward (compare the peer train step in ../shared/peers: ~400 tokens/s for a 25M model here).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.kernels import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    LossConfig,
    PolicyLossInputs,
    TISParams,
    compute_advantages,
    policy_loss,
)
from mtrl_jax.runtime import reexec_with_fast_malloc


def make_packed_batch(rows: int, length: int, seed: int = 0) -> PolicyLossInputs:
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        t, s = 0, 0
        while t < length:
            n = int(rng.integers(200, 2001))
            if t + n > length:
                if s == 0:
                    n = length - t
                else:
                    break  # the rest of the row is padding
            s += 1
            seg[r, t : t + n] = s
            t += n
    shape = (rows, length)
    logp = -rng.exponential(1.0, shape).astype(np.float32)
    old = (logp + rng.normal(0, 0.05, shape)).astype(np.float32)
    # loss only on "assistant" tokens: alternate 64-token spans of prompt/tool and policy tokens
    mask = ((np.arange(length) // 64) % 2 == 1)[None, :] & (seg > 0)
    return PolicyLossInputs(
        logprobs=jnp.asarray(logp),
        old_logprobs=jnp.asarray(old),
        advantages=jnp.asarray(rng.normal(0, 1, shape).astype(np.float32)),
        loss_mask=jnp.asarray(mask),
        segment_ids=jnp.asarray(seg),
        behaviour_logprobs=jnp.asarray((old + rng.normal(0, 0.05, shape)).astype(np.float32)),
        ref_logprobs=jnp.asarray((logp + rng.normal(0, 0.05, shape)).astype(np.float32)),
    )


def time_fn(fn, args, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def bench_losses(shapes, losses, aggregation, repeats):
    records = []
    cfg = LossConfig(aggregation=aggregation, norm_length=4096, kl_coef=0.01,
                     tis=TISParams(mode="truncate", cap=2.0))
    for rows, length in shapes:
        batch = make_packed_batch(rows, length)
        n_seg = int(sum(len(set(r[r > 0].tolist())) for r in np.asarray(batch.segment_ids)))
        for name in losses:
            def step(inp, name=name):
                def f(lp):
                    return policy_loss(name, inp._replace(logprobs=lp), config=cfg)
                (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(inp.logprobs)
                return loss, metrics, grad

            fn = jax.jit(step)
            compile_s, step_s = time_fn(fn, (batch,), repeats)
            rec = dict(kind="loss+grad", loss=name, aggregation=aggregation, rows=rows,
                       length=length, segments=n_seg, compile_s=round(compile_s, 3),
                       step_ms=round(step_s * 1e3, 3),
                       tokens_per_s=round(rows * length / step_s))
            records.append(rec)
            print(f"{name:6s} {aggregation:22s} {rows:3d} x {length:<6d} segs {n_seg:4d}  "
                  f"compile {compile_s:6.2f} s  step {step_s * 1e3:8.2f} ms  "
                  f"{rows * length / step_s / 1e6:8.2f} M tokens/s", flush=True)
    return records


def bench_advantages(num_groups, group_size, repeats):
    records = []
    rng = np.random.default_rng(0)
    rewards = jnp.asarray(rng.integers(0, 2, (num_groups, group_size)).astype(np.float32))
    lengths = jnp.asarray(rng.integers(50, 2000, (num_groups, group_size)))
    turn_rewards = jnp.asarray(rng.random((num_groups, group_size, 8)).astype(np.float32))
    for name in ADVANTAGE_ESTIMATORS:
        est = ADVANTAGE_ESTIMATORS.get(name)
        x = turn_rewards if est.level == "turn" else rewards
        fn = jax.jit(lambda r, n, name=name: compute_advantages(name, r, lengths=n))
        compile_s, step_s = time_fn(fn, (x, lengths), repeats)
        records.append(dict(kind="advantages", method=name, num_groups=num_groups,
                            group_size=group_size, compile_s=round(compile_s, 3),
                            step_ms=round(step_s * 1e3, 4)))
        print(f"{name:22s} [{num_groups} x {group_size}]  compile {compile_s:6.2f} s  "
              f"step {step_s * 1e3:8.4f} ms", flush=True)
    return records


def main(argv=None) -> int:
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="32x4096,8x16384", help="comma list of ROWSxLEN")
    p.add_argument("--losses", default=",".join(POLICY_LOSSES.names()))
    p.add_argument("--aggregation", default="seq_mean_token_mean")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    losses = [s for s in args.losses.split(",") if s]
    for name in losses:
        POLICY_LOSSES.get(name)  # fail fast on a typo

    print(f"# jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({len(jax.devices())} device(s)), python {platform.python_version()}", flush=True)
    records = bench_losses(shapes, losses, args.aggregation, args.repeats)
    records += bench_advantages(64, 8, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(jax=jax.__version__, platform=jax.devices()[0].platform,
                           records=records), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
