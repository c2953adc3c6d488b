"""A/B in one process: the benchmark's LoRA train step (25.3M peer config, 8 x 1024 tokens)
with the training attention of ``transformer.attend`` (``current``) versus earlier forms kept
here or other causal blocks. Variants: ``repeat_kv`` (k/v repeated to all heads, [B, H, T, S]
blocks; the form until 2026-11-27, fifth session), ``softmax`` (that, with ``jax.nn.softmax``
on the scores; until 2026-11-27, fourth session), ``block128`` / ``block64`` (the current form
with causal blocks of that many query rows instead of ``ATTENTION_BLOCK``). All compiled up
front, alternated ``--rounds`` times; ratios are per round, variant time / current time.
(Renamed from ``train_attention_softmax_ab.py``.)

    PYTHONPATH=. python experiments/scripts/train_attention_ab.py --rounds 6 [--variants repeat_kv]
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks.models import train_setup
from mtrl_jax.models import transformer
from mtrl_jax.runtime import reexec_with_fast_malloc
from mtrl_jax.training.lora_step import make_lora_train_step


def repeat_kv_attend(q, k, v, mask, *, causal_block=None, softmax=False):
    """``attend`` as it was with k/v repeated to all heads (``softmax``: and ``jax.nn.softmax``
    over the scores)."""
    t, h, d = q.shape[1:]
    groups = h // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)

    def block(q_blk, k_blk, v_blk, m_blk):
        scores = jnp.einsum("bthd,bshd->bhts", q_blk, k_blk,
                            preferred_element_type=jnp.float32) * d ** -0.5
        scores = jnp.where(m_blk[:, None, :, :], scores, transformer.NEG_INF)
        if softmax:
            return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v_blk)
        e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
        out = jnp.einsum("bhts,bshd->bthd", e, v_blk)
        return out * jnp.transpose(1.0 / jnp.sum(e, axis=-1), (0, 2, 1))[..., None]

    outs = [block(q[:, s:s + causal_block], k[:, :s + causal_block], v[:, :s + causal_block],
                  mask[:, s:s + causal_block, :s + causal_block])
            for s in range(0, t, causal_block)]
    return jnp.concatenate(outs, axis=1)


def main():
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", default="repeat_kv")
    args = p.parse_args()
    _, graphdef, lora, base, data, loss_fn = train_setup()

    tx = optax.adamw(1e-5, weight_decay=0.0)
    opt = tx.init(lora)
    default_attend, steps, losses = transformer.attend, {}, {}

    def fixed_block(impl, size):
        return lambda q, k, v, mask, causal_block=None: impl(q, k, v, mask, causal_block=size)

    impls = {"current": default_attend, "block128": fixed_block(default_attend, 128),
             "block64": fixed_block(default_attend, 64),
             "repeat_kv": fixed_block(repeat_kv_attend, transformer.ATTENTION_BLOCK),
             "softmax": fixed_block(functools.partial(repeat_kv_attend, softmax=True),
                                    transformer.ATTENTION_BLOCK)}
    for name in ["current"] + args.variants.split(","):
        impl = impls[name]
        transformer.attend = impl
        steps[name] = make_lora_train_step(graphdef, tx, loss_fn, donate=False).lower(
            lora, opt, base, data).compile()
        losses[name] = float(steps[name](lora, opt, base, data)[2])
    transformer.attend = default_attend
    print(f"loss {losses}")
    ts = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in steps if r % 2 == 0 else reversed(list(steps)):
            t = time.perf_counter()
            jax.block_until_ready(steps[name](lora, opt, base, data))
            ts[name].append(time.perf_counter() - t)
        print(f"[round {r + 1}] " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in ts.items()),
              flush=True)
    print("median s/step: " + ", ".join(f"{n} {statistics.median(v):.2f} (min {min(v):.2f})"
                                        for n, v in ts.items()))
    for name in list(steps)[1:]:
        ratios = [s / c for c, s in zip(ts["current"], ts[name], strict=True)]
        print(f"{name} / current per-round ratio median {statistics.median(ratios):.3f}x "
              f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
