"""Where the benchmark's LoRA train step spends its time (25.3M peer config, 8 x 1024 tokens):
a ``jax.profiler`` trace of a few steps, op time summed per op and per thread.

    PYTHONPATH=. python experiments/scripts/train_step_profile.py [--calls 2] [--top 40]
"""
import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.models import PEER_CONFIG, PEER_LORA
from experiments.scripts.xla_op_profile import op_times
from mtrl_jax.models import CausalLM, split_lora
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.runtime import reexec_with_fast_malloc
from mtrl_jax.training.lora_step import make_lora_train_step


def train_step_and_args(b=8, length=1024):
    model = CausalLM(PEER_CONFIG, PEER_LORA, rngs=nnx.Rngs(0))
    graphdef, lora, base = split_lora(model)
    rng = np.random.default_rng(1)
    data = dict(tokens=jnp.asarray(rng.integers(1, 8192, (b, length)), jnp.int32),
                adv=jnp.asarray(rng.normal(size=(b,)).astype(np.float32)),
                mask=jnp.zeros((b, length)).at[:, 128:].set(1.0),
                positions=jnp.broadcast_to(jnp.arange(length), (b, length)),
                segments=jnp.ones((b, length), jnp.int32))

    def loss_fn(m, d):
        lp = token_logprobs(m, d["tokens"], d["positions"], d["segments"]).logprobs
        return -jnp.sum(lp * d["adv"][:, None] * d["mask"]) / jnp.sum(d["mask"]), {}

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
