"""A/B in one process: the benchmark's decode (25.3M peer config, batch 32, prompt 128, 128 new
tokens, cache 256) with feature-major decode steps (``CausalLM.decode_logits``, the default)
versus row-major ones (``extend`` + ``logits`` over the same transposed weights). Both compiled
up front, alternated ``--rounds`` times; ms per decode step = (t(128 tokens) - t(1)) / 127.

    PYTHONPATH=. python experiments/scripts/decode_feature_major_ab.py --rounds 8
"""
import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.models import PEER_CONFIG, decode_setup
from mtrl_jax.models import decoding, init_cache
from mtrl_jax.models.transformer import CausalLM as _CLM
from mtrl_jax.runtime import reexec_with_fast_malloc


def row_major(self, cache, tokens, feed, *, use_lora=True, window=None):
    hidden, cache = self.extend(cache, tokens[:, None], feed, use_lora=use_lora, window=window)
    return self.logits(hidden[:, 0]), cache


def main():
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    cfg, b = PEER_CONFIG, args.batch
    model, prompt, lens = decode_setup(batch=b)
    graphdef, state = nnx.split(model)
    feature_major = _CLM.decode_logits
    compiled = {}
    # distinct static min_window values (both give one 256-slot window) so that jit does not
    # reuse the first variant's trace
    for name, impl, mw in (("feature_major", feature_major, 512), ("row_major", row_major, 1024)):
        _CLM.decode_logits = impl
        for n in (128, 1):
            params = decoding.SamplingParams(temperature=1.0, max_tokens=n)
            args_ = (graphdef, state, init_cache(cfg, b, 256), prompt, lens, jax.random.key(0),
                     jnp.full((b,), n, jnp.int32), params, n, True, True, mw)
            compiled[name, n] = decoding._generate_jit.lower(*args_).compile()
    _CLM.decode_logits = feature_major

    def run(name, n):
        exe = compiled[name, n]
        t = time.perf_counter()
        out = exe(state, init_cache(cfg, b, 256), prompt, lens, jax.random.key(0),
                  jnp.full((b,), n, jnp.int32))
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t, out

    outs = {name: run(name, 128)[1] for name in ("feature_major", "row_major")}
    same = np.array_equal(np.asarray(outs["feature_major"].tokens),
                          np.asarray(outs["row_major"].tokens))
    lp_diff = float(np.max(np.abs(np.asarray(outs["feature_major"].logprobs)
                                  - np.asarray(outs["row_major"].logprobs))))
    print(f"same tokens: {same}; max |log-prob diff| {lp_diff:.2e}", flush=True)
    ms = {name: [] for name in ("feature_major", "row_major")}
    for r in range(args.rounds):
        for name in ms:
            tot = run(name, 128)[0]
            pre = run(name, 1)[0]
            ms[name].append((tot - pre) / 127 * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in ms.items()),
              flush=True)
    ratios = [r / f for f, r in zip(ms["feature_major"], ms["row_major"], strict=True)]
    for name, v in ms.items():
        print(f"{name:14s} min {min(v):.1f} median {statistics.median(v):.1f} ms/step")
    print(f"row-major / feature-major per round: median {statistics.median(ratios):.2f}x "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
