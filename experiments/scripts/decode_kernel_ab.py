"""A/B in one process: the benchmark's decode (25.3M peer config, LoRA folded, batch 32, prompt
128, 128 new tokens, cache 256) with the decode steps' attention in the C++ kernel
(``mtrl_jax.models.cpu_kernels``, the default on CPU) versus XLA's formulation
(``generate(..., attention_kernel=False)``). Alternated ``--rounds`` times after compiling
both; ms per decode step = (t(128 tokens) - t(1)) / 127. Also prints how far the two runs'
log-probs are apart (same key: the same tokens unless a near-tie flips).

    PYTHONPATH=. python experiments/scripts/decode_kernel_ab.py --rounds 8
"""
import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.models import PEER_CONFIG, decode_setup
from mtrl_jax.models import init_cache
from mtrl_jax.models.decoding import SamplingParams, generate
from mtrl_jax.runtime import reexec_with_fast_malloc


def main():
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache", type=int, default=256)
    args = p.parse_args()
    cfg, b = PEER_CONFIG, args.batch
    model, prompt, lens = decode_setup(batch=b)

    def run(kernel, n):
        params = SamplingParams(temperature=1.0, max_tokens=n)
        cache = init_cache(cfg, b, args.cache)
        t = time.perf_counter()
        out = generate(model, cache, prompt, lens, jax.random.key(0), params,
                       attention_kernel=kernel)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t, out

    outs = {}
    for kernel in (True, False):
        for n in (128, 1):
            run(kernel, n)
        outs[kernel] = run(kernel, 128)[1]
    same = np.asarray(outs[True].tokens) == np.asarray(outs[False].tokens)
    first_diff = np.where(~same.all(0))[0]
    upto = int(first_diff[0]) if len(first_diff) else same.shape[1]
    lp_diff = np.abs(np.asarray(outs[True].logprobs) - np.asarray(outs[False].logprobs))[:, :upto]
    print(f"tokens equal in {same.mean():.3f} of positions; max |log-prob diff| before the "
          f"first differing column ({upto}): {lp_diff.max():.2e}")
    ms = {True: [], False: []}
    for r in range(args.rounds):
        for kernel in (True, False) if r % 2 == 0 else (False, True):
            full = run(kernel, 128)[0]
            one = run(kernel, 1)[0]
            ms[kernel].append((full - one) / 127 * 1e3)
        print(f"[round {r + 1}] kernel {ms[True][-1]:.2f} ms/step, xla {ms[False][-1]:.2f} "
              f"ms/step, ratio {ms[False][-1] / ms[True][-1]:.2f}x", flush=True)
    ratios = [x / k for k, x in zip(ms[True], ms[False], strict=True)]
    print(f"median ms/step: kernel {statistics.median(ms[True]):.2f} (min {min(ms[True]):.2f}), "
          f"xla {statistics.median(ms[False]):.2f} (min {min(ms[False]):.2f}); per-round ratio "
          f"median {statistics.median(ratios):.2f}x, kernel faster in "
          f"{sum(r > 1 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
