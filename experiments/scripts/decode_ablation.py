"""Where a decode step's time goes, by ablation, in one process: the benchmark's decode (25.3M
peer config, batch 32, prompt 128, 128 new tokens, cache 256) as is, with the cache attention
replaced by a pass-through, with XLA's attention instead of the C++ kernel, and with sampling
replaced by argmax. Variants compiled up front and alternated; ms per decode step =
(t(128 tokens) - t(1)) / 127.

    PYTHONPATH=. python experiments/scripts/decode_ablation.py 10
"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.models import PEER_CONFIG, decode_setup
from mtrl_jax.models import cpu_kernels, decoding, init_cache
from mtrl_jax.runtime import reexec_with_fast_malloc


def no_attend(q, k_new, v_new, write_pos, n_valid, k_cache, v_cache):
    """The kernel's signature, no cache write and no attention."""
    return (q * (1 + jnp.mean(k_cache[..., :1]) + jnp.mean(v_cache[:, :, :1])) + k_new.sum()
            + v_new.sum(), k_cache, v_cache)


def greedy(logits, key, params, *_):
    return jnp.argmax(logits, -1).astype(jnp.int32), jnp.max(logits, -1)


def main(rounds: int) -> int:
    reexec_with_fast_malloc()
    cfg, b = PEER_CONFIG, 32
    model, prompt, lens = decode_setup(batch=b)
    graphdef, state = nnx.split(model)
    attend, sample = cpu_kernels.decode_attention, decoding.sample_from_logits
    # distinct static min_window values (all give one 256-slot window) so jit retraces each
    variants = {"full": (attend, sample, 512, True), "xla_attn": (attend, sample, 4096, False),
                "no_attn": (no_attend, sample, 1024, True),
                "argmax": (attend, greedy, 2048, True)}
    compiled = {}
    for name, (att, samp, mw, kernel) in variants.items():
        cpu_kernels.decode_attention, decoding.sample_from_logits = att, samp
        for n in (128, 1):
            params = decoding.SamplingParams(temperature=1.0, max_tokens=n)
            compiled[name, n] = decoding._generate_jit.lower(
                graphdef, state, init_cache(cfg, b, 256), prompt, lens, jax.random.key(0),
                jnp.full((b,), n, jnp.int32), params, n, True, True, mw, kernel).compile()
    cpu_kernels.decode_attention, decoding.sample_from_logits = attend, sample

    def run(name, n):
        t = time.perf_counter()
        out = compiled[name, n](state, init_cache(cfg, b, 256), prompt, lens,
                                jax.random.key(0), jnp.full((b,), n, jnp.int32))
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t

    for key in compiled:
        run(*key)
    ms = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            ms[name].append((run(name, 128) - run(name, 1)) / 127 * 1e3)
    for name, v in ms.items():
        print(f"{name:8s} min {min(v):.1f} median {statistics.median(v):.1f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 6))
