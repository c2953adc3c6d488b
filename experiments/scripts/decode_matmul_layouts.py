"""Decode-step matmuls (M = 32 rows) in four operand layouts, over the 6 layers' q/k/v/o and
gate/up/down weights of the 25.3M peer config plus the LM head (all weights stream from
memory each step, as in decoding). Alternated ``--rounds`` times in one process.

- xw:    y = x [M, in] @ W [in, out]                      (weights as HF-transposed kernels)
- xwt:   y = x [M, in] . W_t [out, in] contracting in     (current CPU decode layout)
- wtx:   y^T = W_t [out, in] @ x^T [in, M]                 (weight as the LHS operand;
         activations kept transposed [features, M] through the step)
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--M", type=int, default=32)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--reps", type=int, default=10)
args = p.parse_args()
M, Hd, FF, V, L = args.M, 512, 1408, 8192, 6
rng = np.random.default_rng(0)


def w(i, o):
    return jnp.asarray((rng.normal(size=(i, o)) * 0.02).astype(np.float32))


layers = [dict(q=w(Hd, 512), k=w(Hd, 128), v=w(Hd, 128), o=w(512, Hd), g=w(Hd, FF), u=w(Hd, FF),
               d=w(FF, Hd)) for _ in range(L)]
head = w(Hd, V)
layers_t = [{n: a.T.copy() for n, a in lay.items()} for lay in layers]
head_t = head.T.copy()
x0 = jnp.asarray(rng.normal(size=(M, Hd)).astype(np.float32))


def nt(x, wt):  # x [M, K] . wt [N, K] -> [M, N]
    return jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ())))


def step_xw(x, lays, head):
    for lay in lays:
        q, k, v = x @ lay["q"], x @ lay["k"], x @ lay["v"]
        a = q * (1.0 + jnp.mean(k) + jnp.mean(v))
        x = x + a @ lay["o"]
        x = x + (jax.nn.silu(x @ lay["g"]) * (x @ lay["u"])) @ lay["d"]
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    logits = x @ head
    return x + 1e-3 * jnp.max(logits, -1, keepdims=True)


def step_xwt(x, lays, head):
    for lay in lays:
        q, k, v = nt(x, lay["q"]), nt(x, lay["k"]), nt(x, lay["v"])
        a = q * (1.0 + jnp.mean(k) + jnp.mean(v))
        x = x + nt(a, lay["o"])
        x = x + nt(jax.nn.silu(nt(x, lay["g"])) * nt(x, lay["u"]), lay["d"])
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    logits = nt(x, head)
    return x + 1e-3 * jnp.max(logits, -1, keepdims=True)


def step_wtx(xt, lays, head):  # xt [Hd, M]
    for lay in lays:
        q, k, v = lay["q"] @ xt, lay["k"] @ xt, lay["v"] @ xt
        a = q * (1.0 + jnp.mean(k) + jnp.mean(v))
        xt = xt + lay["o"] @ a
        xt = xt + lay["d"] @ (jax.nn.silu(lay["g"] @ xt) * (lay["u"] @ xt))
        xt = xt * jax.lax.rsqrt(jnp.mean(xt * xt, 0, keepdims=True) + 1e-6)
    logits = head @ xt  # [V, M]
    return xt + 1e-3 * jnp.max(logits, 0, keepdims=True)


def step_wtx_fused(xt, lays, head):  # q/k/v and gate/up weights concatenated: 4 dots a layer
    for lay in lays:
        qkv = lay["qkv"] @ xt
        q, k, v = qkv[:512], qkv[512:640], qkv[640:]
        a = q * (1.0 + jnp.mean(k) + jnp.mean(v))
        xt = xt + lay["o"] @ a
        gu = lay["gu"] @ xt
        xt = xt + lay["d"] @ (jax.nn.silu(gu[:FF]) * gu[FF:])
        xt = xt * jax.lax.rsqrt(jnp.mean(xt * xt, 0, keepdims=True) + 1e-6)
    logits = head @ xt  # [V, M]
    return xt + 1e-3 * jnp.max(logits, 0, keepdims=True)


def loop(step):
    return jax.jit(lambda x, lays, head: jax.lax.fori_loop(
        0, args.reps, lambda _, x: step(x, lays, head), x))


fs = dict(xw=(loop(step_xw), x0, layers, head), xwt=(loop(step_xwt), x0, layers_t, head_t),
          wtx=(loop(step_wtx), x0.T.copy(), layers_t, head_t),
          wtx_fused=(loop(step_wtx_fused), x0.T.copy(),
                     [dict(qkv=jnp.concatenate([t["q"], t["k"], t["v"]]), o=t["o"],
                           gu=jnp.concatenate([t["g"], t["u"]]), d=t["d"]) for t in layers_t],
                     head_t))
outs = {n: f(*a).block_until_ready() for n, (f, *a) in fs.items()}
print("max |xwt - xw|", float(jnp.max(jnp.abs(outs["xwt"] - outs["xw"]))),
      "max |wtx^T - xw|", float(jnp.max(jnp.abs(outs["wtx"].T - outs["xw"]))),
      "max |wtx_fused^T - xw|", float(jnp.max(jnp.abs(outs["wtx_fused"].T - outs["xw"]))))
times = {n: [] for n in fs}
for _ in range(args.rounds):
    for n, (f, *a) in fs.items():
        t = time.perf_counter()
        f(*a).block_until_ready()
        times[n].append((time.perf_counter() - t) / args.reps * 1e3)
for n, ts in times.items():
    print(f"{n:9s} min {min(ts):6.2f} median {statistics.median(ts):6.2f} ms per step "
          "(42 dots + head)")
