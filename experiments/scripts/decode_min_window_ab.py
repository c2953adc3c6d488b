"""A/B in one process: the benchmark's decode with a 4,096-slot cache, smallest decode window
512 versus 256 slots (``bench_decode(..., cache_len=4096, min_window)``), alternated 3 rounds.

    PYTHONPATH=. python experiments/scripts/decode_min_window_ab.py
"""
import statistics
import sys

from benchmarks.models import PEER_CONFIG, PEER_LORA, bench_decode
from mtrl_jax.runtime import reexec_with_fast_malloc


def main(rounds: int = 3) -> int:
    reexec_with_fast_malloc()
    measures = {mw: bench_decode(PEER_CONFIG, PEER_LORA, 32, 128, 128, 0, 1, 4096, mw)
                for mw in (512, 256)}
    res = {mw: [] for mw in measures}
    for _ in range(rounds):
        for mw, measure in measures.items():
            out = measure()
            res[mw].append(out["decode_tokens_per_s"])
            print(mw, round(out["decode_tokens_per_s"]), "compile", out["compile_s"], flush=True)
    for mw, v in res.items():
        print(mw, "median", round(statistics.median(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
