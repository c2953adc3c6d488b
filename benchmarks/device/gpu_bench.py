"""The accelerator benchmark (issue 24): one run, one JSON, ours side by side with PyTorch.

    # on the lent GPU machine (one call; see benchmarks/device/h200.sh)
    PYTHONPATH=. python benchmarks/device/gpu_bench.py --out "$OUT/h200.json"
    # here, end to end with tiny shapes (what tests/test_device_bench.py runs)
    JAX_PLATFORMS=cpu python benchmarks/device/gpu_bench.py --tiny --out /tmp/d.json

Stages (``--only``; each is recorded, a failing stage does not stop the others; the JSON is
rewritten after each stage, so a run cut short keeps what it measured):

1. ``tests``: the model, kernel and sampler tests that matter on an accelerator
   (``pytest -m "not slow"`` on TEST_FILES; on a GPU the Pallas attention tests run the
   compiled kernel, not interpret mode);
1b. ``attention``: the packed attention alone (forward + backward of one layer's call on
   ``--rows`` x ``--seq`` packed tokens), the Pallas kernel vs the XLA path: differences and
   time;
2. ``train``: one LoRA step (r16 on every projection, random init, ``--dtype`` bf16 by
   default, ``--rows`` x ``--seq`` = 8 x 4096 packed tokens) at the shapes of Qwen2.5-0.5B and
   1.5B, ours (``benchmarks/models.py``'s step) and the transformers + PEFT peer
   (``torch_peer.py``) on the same device: tokens/s, the ratio, MFU by hardware FLOPs over
   ``--peak-tflops`` (989 = H200 dense bf16), and XLA compiles after the first step (should be
   0);
3. ``decode``: batch 64 and 256, 512 prompt + 512 sampled tokens, ours vs transformers
   ``generate``: decode tokens/s, the ratio, and the share of the memory-bandwidth bound
   (weights + the KV cache read per step over ``--hbm-tbs`` TB/s, 4.8 for the H200);
4. ``rl``: a ``--rl-steps``-step RL run of the demo task (``sop_synth:preflight``, byte
   tokenizer) with the 25M benchmark shape, random init, timing each phase of each step.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from shapes import SHAPES  # noqa: E402

TEST_FILES = ["tests/test_models.py", "tests/test_losses.py", "tests/test_advantages.py",
              "tests/test_jax_sampler.py", "tests/test_shared_prefix.py",
              "tests/test_prefill_chunks.py", "tests/test_flash_attention.py"]


class CompileCounter:
    """XLA backend compiles seen through ``jax.monitoring`` (count and seconds)."""

    def __init__(self):
        import jax.monitoring

        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **_):
        if event.endswith("backend_compile_duration"):
            self.count += 1
            self.seconds += duration


def fingerprint() -> dict:
    import jax

    vers = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy"):
        try:
            vers[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            vers[pkg] = None
    dev = jax.devices()[0]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "packages": vers, "backend": jax.default_backend(), "device": dev.device_kind,
            "devices": len(jax.devices()), "cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def model_config(shape: str, dtype: str, attention: str = "xla"):
    from mtrl_jax.models import ModelConfig

    s = dict(SHAPES[shape])
    return ModelConfig(model_type="qwen2", qkv_bias=True, max_position_embeddings=32768,
                       rope_theta=1e6, dtype=dtype, param_dtype=dtype, attention=attention,
                       **s)


def run_peer(args: list[str], timeout: float) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "torch_peer.py")] + args,
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"peer {' '.join(args)} failed ({out.returncode}): "
                           f"{(out.stderr or out.stdout)[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


def stage_tests(a) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-x",
                          "-p", "no:cacheprovider", "--no-header", *TEST_FILES],
                         capture_output=True, text=True, timeout=a.tests_timeout, cwd=ROOT,
                         # float32 references: no TF32 in XLA's matmuls (the GPU default)
                         env={**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"})
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return {"returncode": out.returncode, "summary": tail, "seconds": time.time() - t0,
            "output_tail": (out.stdout + out.stderr)[-3000:] if out.returncode else ""}


def stage_train(a, counter) -> dict:
    from models import bench_train

    from mtrl_jax.models import LoRAConfig

    res, best = {}, a.attention[0]
    for shape in a.train_shapes:
        by_impl = {}
        # every path on the first shape; the first listed (the expected faster) on the others,
        # to keep the call within its time (the attention stage compares the paths alone)
        impls = a.attention if shape == a.train_shapes[0] else [best]
        for impl in impls:
            cfg = model_config(shape, a.dtype, impl)
            before = counter.count
            try:
                measure = bench_train(cfg, LoRAConfig(rank=16, alpha=32.0), a.rows, a.seq, 128,
                                      a.warmup, a.iters, a.remat, None)
                first = counter.count - before
                ours = measure()
            except Exception as e:
                by_impl[impl] = {"error": f"{type(e).__name__}: {e}"[-1500:]}
                print(f"[train] {shape} attention={impl} failed: {e!r}"[:400], flush=True)
                continue
            ours["attention"] = impl
            ours["compiles_first_step"] = first
            ours["compiles_after_first"] = counter.count - before - first
            ours["mfu_hw"] = ours["flops_hw"] / ours["step_s"] / (a.peak_tflops * 1e12)
            by_impl[impl] = ours
            print(f"[train] {shape} attention={impl}: {ours['tokens_per_s']:.0f} tokens/s, "
                  f"MFU(hw) {ours['mfu_hw']:.3f}", flush=True)
        done = [o for o in by_impl.values() if "tokens_per_s" in o]
        if not done:
            raise RuntimeError(f"{shape}: every attention path failed: {by_impl}")
        ours = max(done, key=lambda o: o["tokens_per_s"])  # the faster path is the result
        best = ours["attention"]
        rec = {"ours": ours, "ours_by_attention": by_impl}
        try:
            peer = run_peer(["train", "--shape", shape, "--rows", str(a.rows), "--seq",
                             str(a.seq), "--dtype", a.dtype, "--iters", str(a.iters),
                             "--warmup", str(a.warmup)], a.peer_timeout)
            rec["peer"] = peer
            rec["ratio_vs_peer"] = ours["tokens_per_s"] / peer["tokens_per_s"]
            peer["mfu_hw"] = ours["flops_hw"] / peer["step_s"] / (a.peak_tflops * 1e12)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rec["peer_error"] = str(e)[-1500:]
        res[shape] = rec
        print(f"[train] {shape} (attention={ours['attention']}): "
              f"{ours['tokens_per_s']:.0f} tokens/s, MFU(hw) "
              f"{ours['mfu_hw']:.3f}, ratio vs peer {rec.get('ratio_vs_peer', float('nan')):.2f}"
              f", compiles after the first step {ours['compiles_after_first']}", flush=True)
    return res


def stage_attention(a) -> dict:
    """The packed attention alone, per layer-sized call: the Pallas kernel against the XLA path
    on ``--rows`` x ``--seq`` rows of episodes (256-1,024 tokens, half of them in shared-prefix
    groups): the largest output and gradient differences, and forward+backward time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtrl_jax.models.flash_attention import flash_attention
    from mtrl_jax.models.transformer import attend, packed_mask

    s = SHAPES[a.train_shapes[0]]
    h, kv, d = s["num_heads"], s["num_kv_heads"], s["head_dim"]
    rng = np.random.default_rng(0)
    seg = np.zeros((a.rows, a.seq), np.int32)
    par = np.zeros((a.rows, a.seq), np.int32)
    lo, hi = (a.seq // 16, a.seq // 4) if a.seq >= 1024 else (8, 32)
    for r in range(a.rows):
        pos, sid = 0, 1
        while pos < a.seq - lo:
            n = int(rng.integers(lo, hi + 1))
            seg[r, pos:pos + n] = sid
            if rng.random() < 0.5 and sid > 1 and par[r, pos - 1] == 0:
                par[r, pos:pos + n] = sid - 1  # a child of the previous segment
            pos, sid = min(pos + n, a.seq), sid + 1
    dt = jnp.dtype(a.dtype)
    q = jnp.asarray(rng.normal(size=(a.rows, a.seq, h, d)), dt)
    k = jnp.asarray(rng.normal(size=(a.rows, a.seq, kv, d)), dt)
    v = jnp.asarray(rng.normal(size=(a.rows, a.seq, kv, d)), dt)
    w = jnp.asarray(rng.normal(size=q.shape), dt) * jnp.asarray(seg > 0)[..., None, None]
    segj, parj = jnp.asarray(seg), jnp.asarray(par)
    impls = {"xla": lambda q, k, v: attend(q, k, v, packed_mask(segj, parj), causal_block=1024),
             "pallas": lambda q, k, v: flash_attention(q, k, v, segj, parj)}
    res, outs = {}, {}
    for name, f in impls.items():
        step = jax.jit(jax.value_and_grad(
            lambda q, k, v, f=f: jnp.sum((f(q, k, v) * w).astype(jnp.float32)),
            argnums=(0, 1, 2)))
        try:
            outs[name] = jax.block_until_ready(step(q, k, v))
            times = []
            for _ in range(max(a.iters, 3)):
                t0 = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times.append(time.perf_counter() - t0)
            res[name] = {"fwd_bwd_s": statistics.median(times)}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[-1500:]}
    if all("fwd_bwd_s" in r for r in res.values()):
        (lx, gx), (lp, gp) = outs["xla"], outs["pallas"]
        res["loss_rel_diff"] = float(abs(lp - lx) / max(abs(lx), 1e-6))
        res["grad_rel_diff"] = {n: float(jnp.max(jnp.abs((b - c).astype(jnp.float32)))
                                         / jnp.max(jnp.abs(b.astype(jnp.float32))))
                                for n, b, c in zip("qkv", gx, gp, strict=True)}
        res["speedup_pallas_vs_xla"] = res["xla"]["fwd_bwd_s"] / res["pallas"]["fwd_bwd_s"]
    res["tokens_real"] = int((seg > 0).sum())
    print(f"[attention] {json.dumps(res, default=str)[:600]}", flush=True)
    return res


def stage_decode(a, counter) -> dict:
    from models import bench_decode

    from mtrl_jax.models import LoRAConfig

    res = {}
    cfg = model_config(a.decode_shape, a.dtype)
    itemsize = 2 if a.dtype in ("bfloat16", "float16") else 4
    weight_bytes = cfg.num_params() * itemsize
    for batch in a.decode_batches:
        before = counter.count
        measure = bench_decode(cfg, LoRAConfig(rank=16, alpha=32.0), batch, a.prompt, a.new,
                               a.warmup, a.iters)
        first = counter.count - before
        ours = measure()
        ours["compiles_after_first"] = counter.count - before - first
        step_s = ours["decode_s"] / max(1, a.new - 1)
        mean_len = a.prompt + a.new / 2
        kv_bytes = (batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * mean_len
                    * itemsize)
        ours["bandwidth_share"] = (weight_bytes + kv_bytes) / step_s / (a.hbm_tbs * 1e12)
        rec = {"ours": ours, "bytes_per_step": weight_bytes + kv_bytes}
        try:
            peer = run_peer(["decode", "--shape", a.decode_shape, "--batch", str(batch),
                             "--prompt", str(a.prompt), "--new", str(a.new), "--dtype", a.dtype,
                             "--iters", str(a.iters), "--warmup", str(a.warmup)],
                            a.peer_timeout)
            rec["peer"] = peer
            rec["ratio_vs_peer"] = ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rec["peer_error"] = str(e)[-1500:]
        res[f"batch{batch}"] = rec
        print(f"[decode] batch {batch}: {ours['decode_tokens_per_s']:.0f} tokens/s, "
              f"{ours['bandwidth_share']:.3f} of the bandwidth bound, ratio vs peer "
              f"{rec.get('ratio_vs_peer', float('nan')):.2f}", flush=True)
    return res


def stage_rl(a) -> dict:
    from mtrl_jax.training.trainer import MultiTurnRLTrainer

    s = {k: v for k, v in SHAPES[a.rl_shape].items() if k != "vocab_size"}
    tiny = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                           for k, v in s.items()) + "}"
    out = tempfile.mkdtemp(prefix="mtrl-device-rl-")
    over = [f"model.tiny={tiny}", f"model.dtype={a.dtype}", "data.task=sop_synth:preflight",
            "data.n_val=2", "data.n_test=2", f"rollout.batch_size={a.rl_tasks}",
            "rollout.group_size=8", "rollout.max_turns=3", "rollout.sampling_max_tokens=64",
            "rollout.max_context_tokens=2048", "packing.row_lengths=[2048]",
            f"steps={a.rl_steps}", "eval_interval=0", "checkpoint_interval=0", "tracker=jsonl",
            f"output_dir={out}"]
    t0 = time.perf_counter()
    t = MultiTurnRLTrainer(None, overrides=over, verbose=False)
    hist = t.train()
    t.close()
    keys = ("time/step_s", "time/rollout_s", "time/train_s", "rollout/sampled_tokens",
            "train/tokens")
    steps = [{k: h.get(k) for k in keys} for h in hist]
    later = steps[1:] or steps
    return {"steps": steps, "wall_s": time.perf_counter() - t0, "overrides": over,
            "median_after_first": {k: statistics.median(s[k] for s in later if s[k] is not None)
                                   for k in keys}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="tests,attention,train,decode,rl")
    p.add_argument("--attention", default="pallas,xla",
                   help="the attention paths the train stage measures (the faster one counts)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU test)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--hbm-tbs", type=float, default=4.8)
    p.add_argument("--rl-steps", type=int, default=30)
    p.add_argument("--rl-tasks", type=int, default=16)
    p.add_argument("--peer-timeout", type=float, default=240)
    p.add_argument("--tests-timeout", type=float, default=150)
    a = p.parse_args(argv)
    a.attention = [x for x in a.attention.split(",") if x]
    a.train_shapes, a.decode_shape, a.rl_shape = ["qwen2.5-0.5b", "qwen2.5-1.5b"], \
        "qwen2.5-0.5b", "bench-25m"
    a.decode_batches = [64, 256]
    if a.tiny:
        a.train_shapes, a.decode_shape, a.rl_shape = ["tiny"], "tiny", "tiny"
        a.decode_batches, a.rows, a.seq, a.prompt, a.new = [4], 2, 256, 16, 16
        a.warmup, a.iters, a.rl_steps, a.rl_tasks = 1, 2, 2, 2
        a.dtype = "float32"
    counter = CompileCounter()
    rec = {"fingerprint": fingerprint(), "args": {k: v for k, v in vars(a).items()},
           "stages": {}}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(rec, f, indent=1, default=float)
        os.replace(a.out + ".tmp", a.out)

    stages = {"tests": lambda: stage_tests(a), "attention": lambda: stage_attention(a),
              "train": lambda: stage_train(a, counter),
              "decode": lambda: stage_decode(a, counter), "rl": lambda: stage_rl(a)}
    for name in a.only.split(","):
        t0 = time.perf_counter()
        print(f"[device] stage {name}", flush=True)
        try:
            rec["stages"][name] = {"ok": True, "result": stages[name]()}
        except Exception as e:
            import traceback

            rec["stages"][name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
            print(f"[device] stage {name} failed: {e!r}", flush=True)
        rec["stages"][name]["seconds"] = time.perf_counter() - t0
        save()
    rec["complete"] = True
    save()
    return 0 if all(s["ok"] for s in rec["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
