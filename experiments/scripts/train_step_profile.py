"""Where the benchmark's LoRA train step spends its time (25.3M peer config, 8 x 1024 tokens):
a ``jax.profiler`` trace of a few steps, op time summed per op and per thread.

    PYTHONPATH=. python experiments/scripts/train_step_profile.py [--calls 2] [--top 40]
"""
import argparse

import optax

from benchmarks.models import train_setup
from experiments.scripts.xla_op_profile import op_times
from mtrl_jax.runtime import reexec_with_fast_malloc
from mtrl_jax.training.lora_step import make_lora_train_step


def train_step_and_args():
    _, graphdef, lora, base, data, loss_fn = train_setup()
    tx = optax.adamw(1e-5, weight_decay=0.0)
    step = make_lora_train_step(graphdef, tx, loss_fn)
    return step, (lora, tx.init(lora), base, data)


def main():
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    step, (lora, opt, base, data) = train_step_and_args()
    state = dict(lora=lora, opt=opt)

    def one_step():  # the step donates the LoRA parameters and optimiser state
        state["lora"], state["opt"], loss, _, _ = step(state["lora"], state["opt"], base, data)
        return loss

    tot = op_times(one_step, calls=args.calls, top=args.top)
    kinds = {}
    for name, ms in tot.items():
        if name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
            continue  # Python frames and executor spans enclose the ops
        kind = name.split(".")[0].rstrip("_0123456789")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    print(f"per op kind (ms per step, summed over threads; all ops {sum(kinds.values()):.0f}):")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms:9.1f}  {kind}")


if __name__ == "__main__":
    main()
