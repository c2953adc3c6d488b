"""Per-op time of a jitted CPU function from a jax.profiler trace (helper for decode A/Bs).

    from experiments.scripts.xla_op_profile import op_times
    op_times(fn, *args, calls=3)  # -> {op name: total ms per call}, sorted
"""
import collections
import glob
import os
import tempfile

import jax
from jax._src.lib import _profile_data


def op_times(fn, *args, calls=3, top=25):
    fn(*args)
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    prof = _profile_data.ProfileData.from_file(path)
    tot = collections.Counter()
    threads = collections.Counter()
    for plane in prof.planes:
        for line in plane.lines:
            for ev in line.events:
                tot[ev.name] += ev.duration_ns / 1e6 / calls
                threads[(plane.name, line.name)] += ev.duration_ns / 1e6 / calls
    for (plane, line), ms in threads.most_common(8):
        print(f"  thread {plane[:30]}/{line[:30]}: {ms:.2f} ms busy per call")
    for name, ms in tot.most_common(top):
        print(f"  {ms:8.3f} ms  {name[:100]}")
    return tot
