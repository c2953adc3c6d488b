"""Model benchmark on the peers' 25.3M-parameter Qwen2-layout config (``../shared/peers``).

    python benchmarks/models.py                    # ours: train step, decoding, log-prob memory
    python benchmarks/models.py --peers ../shared/peers --rounds 3 \
        --json experiments/models_bench.json

Config: hidden 512, intermediate 1408, 6 layers, 8 heads x 64, 2 kv heads, vocab 8192, untied,
q/k/v bias, random init, f32 (25,308,160 params); LoRA r=16, alpha=32 on q/k/v/o/gate/up/down.

- train: one LoRA step on 8 x 1024 tokens exactly as the peer: log-probs of the shifted targets,
  ``-sum(logp * adv * mask) / sum(mask)`` with the mask on targets after a 128-token prompt,
  backward, AdamW on the LoRA parameters. Median of ``--iters`` after warm-up.
- decode: batch 32, prompt 128, 128 new tokens, pure sampling at temperature 1, no stop token;
  ``total`` = prefill + 128 sampled tokens, ``prefill`` = a 1-token run, ``decode`` = the
  difference (127 steps), as the peer measures.
- long_cache: the decode benchmark with a 4,096-slot cache: the default decode steps (on CPU the
  C++ attention kernel, reading each row's own slots) and XLA's attention over growing windows
  of the cache, each versus XLA's attention over all of it; alternated ``--rounds`` times.
- logprob_memory: compiled temporary memory of the chunked log-prob + its gradient over
  vocab 151,936 x 8,192 tokens (hidden 896) versus the bytes of the full f32 logits.

MFU uses the f32 matmul peak measured by this script (median n^3 GEMM in jax, n in {1024,
2048}, before and after), and the same FLOP formulas as the peer scripts. With ``--peers`` the
PyTorch peer scripts run in this process's Python, one at a time, after ours; ``--rounds N``
alternates ours and the peer N times and reports the median of the per-round ratios (single
figures move by up to 20% on this shared 2-core machine; alternating makes slow spells hit both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtrl_jax.models import CausalLM, LoRAConfig, ModelConfig, init_cache, split_lora
from mtrl_jax.models.decoding import MIN_DECODE_WINDOW, SamplingParams, generate
from mtrl_jax.models.logprobs import head_logprobs, token_logprobs
from mtrl_jax.runtime import reexec_with_fast_malloc
from mtrl_jax.training.lora_step import make_lora_train_step

PEER_CONFIG = ModelConfig(model_type="qwen2", vocab_size=8192, hidden_size=512,
                          intermediate_size=1408, num_layers=6, num_heads=8, num_kv_heads=2,
                          head_dim=64, qkv_bias=True, tie_word_embeddings=False,
                          rope_theta=1e6, max_position_embeddings=4096)
PEER_LORA = LoRAConfig(rank=16, alpha=32.0)


def matmul_peak(sizes=(1024, 2048), iters=10) -> float:
    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
        f = jax.jit(lambda x, y: x @ y)
        for _ in range(2):
            f(a, a).block_until_ready()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(ts))
    return best


def train_setup(cfg=PEER_CONFIG, lora=PEER_LORA, batch=8, seq=1024, prompt_len=128, remat=False,
                chunk=None):
    """The train benchmark's model split ``(graphdef, lora params, base)``, batch (random tokens,
    seed 1) and loss, as the peer computes it (also used by the scripts in experiments/scripts/).
    Returns ``(model, graphdef, lora_params, base, data, loss_fn)``."""
    model = CausalLM(cfg, lora, rngs=nnx.Rngs(0))
    graphdef, lora_p, base = split_lora(model)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, seq)), jnp.int32)
    adv = jnp.asarray(rng.normal(size=(batch,)).astype(np.float32))
    mask = jnp.zeros((batch, seq)).at[:, prompt_len:].set(1.0)  # targets after the prompt
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    segments = jnp.ones((batch, seq), jnp.int32)
    data = dict(tokens=tokens, adv=adv, mask=mask, positions=positions, segments=segments)

    def loss_fn(m, d):
        lp = token_logprobs(m, d["tokens"], d["positions"], d["segments"], chunk_size=chunk,
                            remat=remat).logprobs
        return -jnp.sum(lp * d["adv"][:, None] * d["mask"]) / jnp.sum(d["mask"]), {}

    return model, graphdef, lora_p, base, data, loss_fn


def bench_train(cfg, lora, batch, seq, prompt_len, warmup, iters, remat, chunk):
    model, graphdef, lora_p, base, data, loss_fn = train_setup(cfg, lora, batch, seq, prompt_len,
                                                               remat, chunk)
    n_params = cfg.num_params()
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))

    tx = optax.adamw(1e-5, weight_decay=0.0)
    opt = tx.init(lora_p)
    step = make_lora_train_step(graphdef, tx, loss_fn)
    state = dict(lora=lora_p, opt=opt)

    def one_step():
        state["lora"], state["opt"], loss, _, _ = step(state["lora"], state["opt"], base, data)
        jax.block_until_ready(loss)
        return float(loss)

    t0 = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - t0
    tokens_n = batch * seq
    n_embed = cfg.vocab_size * cfg.hidden_size
    flops_attn = 12 * cfg.num_layers * cfg.hidden_size * seq * tokens_n
    flops = 6 * n_params * tokens_n + flops_attn
    flops_hw = 4 * (n_params - n_embed) * tokens_n + 6 * n_lora * tokens_n + flops_attn

    def measure():
        for _ in range(warmup):
            one_step()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            loss = one_step()
            times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        return dict(step_s=step_s, step_s_all=[round(t, 3) for t in times],
                    compile_s=round(compile_s, 2), tokens_per_s=tokens_n / step_s,
                    flops=flops, flops_hw=flops_hw, params=n_params, lora_params=n_lora,
                    loss=loss)

    return measure


def decode_setup(cfg=PEER_CONFIG, lora=PEER_LORA, batch=32, prompt_len=128):
    """The decode benchmark's model (random init, seed 0) and prompts ``[batch, prompt_len]``
    with their lengths (also used by the A/B scripts in experiments/scripts/)."""
    model = CausalLM(cfg, lora, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    return model, prompt, jnp.full((batch,), prompt_len, jnp.int32)


def bench_decode(cfg, lora, batch, prompt_len, new_tokens, warmup, iters, cache_len=None,
                 min_window=MIN_DECODE_WINDOW, attention_kernel=True):
    model, prompt, lens = decode_setup(cfg, lora, batch, prompt_len)
    cache_len = cache_len or prompt_len + new_tokens

    def run(n):
        params = SamplingParams(temperature=1.0, max_tokens=n)
        cache = init_cache(cfg, batch, cache_len)
        t = time.perf_counter()
        out = generate(model, cache, prompt, lens, jax.random.key(0), params,
                       min_window=min_window, attention_kernel=attention_kernel)
        jax.block_until_ready(out.tokens)
        dt = time.perf_counter() - t
        assert int(out.num_tokens.min()) == n
        return dt

    t0 = time.perf_counter()
    run(new_tokens)
    run(1)
    compile_s = time.perf_counter() - t0
    n_params = cfg.num_params()
    n_embed = cfg.vocab_size * cfg.hidden_size
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    n_matmul = n_params - n_embed + n_lora
    flops = sum(batch * (2 * n_matmul + 4 * cfg.num_layers * cfg.hidden_size * (prompt_len + i))
                for i in range(1, new_tokens))

    def measure():
        for _ in range(warmup):
            run(new_tokens)
            run(1)
        total = statistics.median([run(new_tokens) for _ in range(iters)])
        pre = statistics.median([run(1) for _ in range(iters)])
        decode_s = total - pre
        return dict(total_s=total, prefill_s=pre, decode_s=decode_s,
                    compile_s=round(compile_s, 2),
                    decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
                    end_to_end_tokens_per_s=batch * new_tokens / total, decode_flops=flops)

    return measure


def bench_long_cache(cfg, lora, batch, prompt_len, new_tokens, cache_len, iters, rounds):
    """The decode benchmark with a cache of ``cache_len`` slots (a sampler sized for whole
    episodes), three ways, alternated ``rounds`` times: the default (the C++ attention kernel
    reading each row's own slots), XLA's attention over growing windows of the cache, and XLA's
    attention over the whole cache. Ratios: medians of the per-round ratios to the last."""
    variants = dict(
        kernel=bench_decode(cfg, lora, batch, prompt_len, new_tokens, 0, iters, cache_len),
        xla_windowed=bench_decode(cfg, lora, batch, prompt_len, new_tokens, 0, iters, cache_len,
                                  attention_kernel=False),
        xla_whole_cache=bench_decode(cfg, lora, batch, prompt_len, new_tokens, 0, iters,
                                     cache_len, None, attention_kernel=False))
    out = dict(cache_len=cache_len, min_window=MIN_DECODE_WINDOW, rounds=[])
    for r in range(rounds):
        speed = {name: m()["decode_tokens_per_s"] for name, m in variants.items()}
        out["rounds"].append(speed)
        print(f"[round {r + 1}] decode b{batch}, cache {cache_len}, tokens/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in speed.items()), flush=True)
    for name in ("kernel", "xla_windowed"):
        out[f"{name}_vs_whole_cache"] = statistics.median(
            e[name] / e["xla_whole_cache"] for e in out["rounds"])
    return out


def bench_logprob_memory(vocab=151_936, tokens=8192, hidden=896, chunk=1024):
    hid = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
    tgt = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    w = jax.ShapeDtypeStruct((hidden, vocab), jnp.float32)

    def loss(h, t, w, chunk_size):
        return jnp.sum(head_logprobs(h, t, w, chunk_size=chunk_size).logprobs)

    out = {}
    for name, c in (("chunked", chunk), ("unchunked", tokens)):
        f = jax.jit(jax.value_and_grad(lambda h, t, w, c=c: loss(h, t, w, c), argnums=(0, 2)))
        mem = f.lower(hid, tgt, w).compile().memory_analysis()
        out[name] = dict(chunk=c, temp_bytes=mem.temp_size_in_bytes,
                         argument_bytes=mem.argument_size_in_bytes,
                         output_bytes=mem.output_size_in_bytes)
    out["full_logits_f32_bytes"] = tokens * vocab * 4
    return out


def run_peer(script, args):
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    reexec_with_fast_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="train,decode,long_cache,memory")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--chunk", type=int, default=None,
                   help="log-prob chunk (default: automatic, see mtrl_jax.models.logprobs)")
    p.add_argument("--peers", default=None, help="folder of the PyTorch peer scripts")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate ours and the peer this many times (ratio: median of rounds)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    rec = dict(jax=jax.__version__, python=platform.python_version(),
               device=str(jax.devices()[0].device_kind), date=time.strftime("%Y-%m-%d"))
    peak_before = matmul_peak()
    measures = {}
    if "train" in only:
        measures["train"] = bench_train(PEER_CONFIG, PEER_LORA, 8, 1024, 128, args.warmup,
                                        args.iters, args.remat, args.chunk)
    if "decode" in only:
        measures["decode"] = bench_decode(PEER_CONFIG, PEER_LORA, 32, 128, 128, 1, args.iters)
    peer_scripts = dict(train="torch_train_step.py", decode="torch_generate.py")
    speed_key = dict(train="tokens_per_s", decode="decode_tokens_per_s")  # same in the peers
    rounds = {name: [] for name in measures}
    # Rounds alternate ours and the peer, so that a slow spell of the machine (CPU steal moves
    # single figures by up to 20% here) hits both sides alike; the ratio reported is the
    # median of the per-round ratios.
    for r in range(args.rounds):
        for name, measure in measures.items():
            ours = measure()
            entry = dict(ours=ours)
            if name == "train":
                print(f"[round {r + 1}] train  8x1024: {ours['step_s']:.2f} s/step, "
                      f"{ours['tokens_per_s']:.0f} tokens/s (compile {ours['compile_s']} s)",
                      flush=True)
            else:
                print(f"[round {r + 1}] decode b32: {ours['decode_tokens_per_s']:.0f} decode "
                      f"tokens/s, {ours['end_to_end_tokens_per_s']:.0f} end-to-end (prefill "
                      f"{ours['prefill_s']:.2f} s, compile {ours['compile_s']} s)", flush=True)
            if args.peers:
                peer = run_peer(os.path.join(args.peers, peer_scripts[name]),
                                ["--threads", "2", "--iters", str(args.iters)])
                entry["peer"] = peer
                entry["ratio"] = ours[speed_key[name]] / peer[speed_key[name]]
                print(f"[round {r + 1}] peer {name}: {peer[speed_key[name]]} tokens/s; ours/peer "
                      f"= {entry['ratio']:.2f}x", flush=True)
            rounds[name].append(entry)
    if "long_cache" in only:
        rec["decode_long_cache"] = r = bench_long_cache(PEER_CONFIG, PEER_LORA, 32, 128, 128,
                                                        4096, 1, max(1, args.rounds))
        print(f"decode with a 4096-slot cache, vs XLA's attention over the whole cache: "
              f"kernel {r['kernel_vs_whole_cache']:.2f}x, XLA windowed "
              f"{r['xla_windowed_vs_whole_cache']:.2f}x", flush=True)
    if "memory" in only:
        r = bench_logprob_memory()
        rec["logprob_memory"] = r
        print(f"log-probs 8192 x 151936: chunked temp {r['chunked']['temp_bytes'] / 2**20:.0f} MiB"
              f", unchunked {r['unchunked']['temp_bytes'] / 2**20:.0f} MiB, full logits "
              f"{r['full_logits_f32_bytes'] / 2**20:.0f} MiB", flush=True)
    peak = max(peak_before, matmul_peak())
    rec["matmul_peak_gflops"] = peak / 1e9
    for name, entries in rounds.items():
        # the round with the median ratio (or the median speed without peers) stands for all
        key = (lambda e: e["ratio"]) if args.peers else (lambda e, n=name: e["ours"][speed_key[n]])
        mid = sorted(entries, key=key)[len(entries) // 2]
        rec[name] = dict(mid["ours"])
        rec[name]["rounds"] = [dict(ours=e["ours"][speed_key[name]],
                                    peer=e.get("peer", {}).get(speed_key[name]),
                                    ratio=e.get("ratio")) for e in entries]
        if args.peers:
            rec["peer_" + name] = mid["peer"]
            rec[name]["ratio_vs_peer"] = statistics.median(e["ratio"] for e in entries)
    if "train" in rec:
        t = rec["train"]
        t["mfu"] = t["flops"] / t["step_s"] / peak
        t["mfu_hw_est"] = t["flops_hw"] / t["step_s"] / peak
        print(f"train: {t['tokens_per_s']:.0f} tokens/s, MFU {t['mfu']:.3f} (hw est "
              f"{t['mfu_hw_est']:.3f}), peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    if "decode" in rec:
        d = rec["decode"]
        d["decode_mfu"] = d["decode_flops"] / d["decode_s"] / peak
        print(f"decode: {d['decode_tokens_per_s']:.0f} tokens/s, MFU {d['decode_mfu']:.3f}",
              flush=True)
        if args.peers:
            d["end_to_end_ratio_vs_peer"] = (
                d["end_to_end_tokens_per_s"] / rec["peer_decode"]["new_tokens_per_s_end_to_end"])
    for name in rounds:
        if args.peers:
            ratios = [e["ratio"] for e in rounds[name]]
            print(f"{name}: ours/peer median over {len(ratios)} rounds = "
                  f"{rec[name]['ratio_vs_peer']:.2f}x (rounds: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
