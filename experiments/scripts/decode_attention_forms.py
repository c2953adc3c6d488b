"""Decode-step cache attention: which formulation XLA:CPU runs fastest (batch 32, KV 2, G 4,
D 64, cache 256 slots, 6 layers of cache so it streams from memory). Variants alternated
``--rounds`` times in one process; ms per 6-layer step (min / median)."""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--B", type=int, default=32)
p.add_argument("--S", type=int, default=256)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--reps", type=int, default=20)
p.add_argument("--only", default="")
args = p.parse_args()
B, KV, G, D, S, L = args.B, 2, 4, 64, args.S, 6
rng = np.random.default_rng(0)
K_DS = [jnp.asarray(rng.normal(size=(B, KV, D, S)).astype(np.float32)) for _ in range(L)]
V_SD = [jnp.asarray(rng.normal(size=(B, KV, S, D)).astype(np.float32)) for _ in range(L)]
K_SD = [jnp.swapaxes(k, -1, -2) for k in K_DS]
V_DS = [jnp.swapaxes(v, -1, -2) for v in V_SD]
x0 = jnp.asarray(rng.normal(size=(B, KV * G * D)).astype(np.float32))
sc = D ** -0.5


def softmax(s):
    return jax.nn.softmax(s * sc, axis=-1)


def cur(q, i):  # scores: reduce over D of [B,KV,G,D,S]; out: reduce over S of [B,KV,G,S,D]
    k, v = K_DS[i], V_SD[i]
    s = jnp.sum(q.reshape(B, KV, G, D, 1) * k[:, :, None], axis=-2)
    p = softmax(s)
    return jnp.sum(p[..., None] * v[:, :, None], axis=-2)


def per_g(q, i):
    k, v = K_DS[i], V_SD[i]
    q = q.reshape(B, KV, G, D)
    outs = []
    for g in range(G):
        s = jnp.sum(q[:, :, g, :, None] * k, axis=-2)  # [B,KV,S]
        p = softmax(s)
        outs.append(jnp.sum(p[..., None] * v, axis=-2))  # [B,KV,D]
    return jnp.stack(outs, axis=2)


def dots(q, i):
    k, v = K_DS[i], V_SD[i]
    s = jnp.einsum("bkgd,bkds->bkgs", q.reshape(B, KV, G, D), k)
    return jnp.einsum("bkgs,bksd->bkgd", softmax(s), v)


def dots_vds(q, i):  # values stored [D, S]: out = p @ V^T
    k, v = K_DS[i], V_DS[i]
    s = jnp.einsum("bkgd,bkds->bkgs", q.reshape(B, KV, G, D), k)
    return jnp.einsum("bkgs,bkds->bkgd", softmax(s), v)


def red_vds(q, i):  # out: reduce over minor S of [B,KV,G,D,S]
    k, v = K_DS[i], V_DS[i]
    s = jnp.sum(q.reshape(B, KV, G, D, 1) * k[:, :, None], axis=-2)
    p = softmax(s)
    return jnp.sum(p[:, :, :, None, :] * v[:, :, None], axis=-1)


def ksd(q, i):  # keys [S, D]: reduce over minor D
    k, v = K_SD[i], V_SD[i]
    s = jnp.sum(q.reshape(B, KV, G, 1, D) * k[:, :, None], axis=-1)
    p = softmax(s)
    return jnp.sum(p[..., None] * v[:, :, None], axis=-2)


def flat_dot(q, i):  # one dot per layer over all (b, kv): block structure via batch dims only
    k, v = K_DS[i], V_SD[i]
    qf = q.reshape(B * KV, G, D)
    s = jax.lax.dot_general(qf, k.reshape(B * KV, D, S), (((2,), (1,)), ((0,), (0,))))
    p = softmax(s)
    o = jax.lax.dot_general(p, v.reshape(B * KV, S, D), (((2,), (1,)), ((0,), (0,))))
    return o


variants = dict(cur=cur, per_g=per_g, dots=dots, dots_vds=dots_vds, red_vds=red_vds, ksd=ksd,
                flat_dot=flat_dot)
if args.only:
    variants = {k: variants[k] for k in args.only.split(",")}


def make(fn):
    def step(x):
        for i in range(L):
            x = x + fn(x, i).reshape(B, -1)
            x = x / (1.0 + jnp.abs(x).mean(-1, keepdims=True))
        return x
    return jax.jit(lambda x: jax.lax.fori_loop(0, args.reps, lambda _, x: step(x), x))


fs = {n: make(f) for n, f in variants.items()}
ref = None
for n, f in fs.items():
    y = f(x0).block_until_ready()
    ref = y if ref is None else ref
    print(f"{n}: max |diff| vs first {float(jnp.max(jnp.abs(y - ref))):.2e}")
times = {n: [] for n in fs}
for _ in range(args.rounds):
    for n, f in fs.items():
        t = time.perf_counter()
        f(x0).block_until_ready()
        times[n].append((time.perf_counter() - t) / args.reps * 1e3)
for n, ts in times.items():
    print(f"{n:10s} min {min(ts):6.2f} median {statistics.median(ts):6.2f} ms per 6-layer step")
