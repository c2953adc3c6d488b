"""The PyTorch peer on the same accelerator: a LoRA train step (transformers + PEFT) and
``generate``, at the shapes ``gpu_bench.py`` measures ours at. Prints one JSON line.

    python benchmarks/device/torch_peer.py train --shape qwen2.5-0.5b --rows 8 --seq 4096
    python benchmarks/device/torch_peer.py decode --shape qwen2.5-0.5b --batch 64 \\
        --prompt 512 --new 512

Random init (seed 0) in bf16 (``--dtype``), LoRA r16 alpha 32 on q/k/v/o/gate/up/down. The
train step: log-probs of the shifted targets, ``-sum(logp * adv * mask) / sum(mask)`` with the
mask on targets after a 128-token prompt, backward, AdamW on the LoRA parameters (what ours
computes in ``benchmarks/models.py``). ``decode``: ``model.generate`` with sampling at
temperature 1, no stop token, the KV cache on; prefill timed as a 1-token generate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from shapes import SHAPES


def _model(shape: str, dtype, device, lora: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                      intermediate_size=s["intermediate_size"],
                      num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                      num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"],
                      tie_word_embeddings=s["tie_word_embeddings"],
                      max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(args, device, dtype) -> dict:
    model = _model(args.shape, dtype, device, lora=True)
    model.train()
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    tokens = torch.randint(1, vocab, (args.rows, args.seq), generator=g).to(device)
    adv = torch.randn(args.rows, generator=g).to(device)
    mask = torch.zeros(args.rows, args.seq - 1, device=device)
    mask[:, 127:] = 1.0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        loss = -(lp * adv[:, None] * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return {"step_s": s, "tokens_per_s": args.rows * args.seq / s,
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                             if device.type == "cuda" else None)}


def decode(args, device, dtype) -> dict:
    model = _model(args.shape, dtype, device, lora=False)
    model.eval()
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompt = torch.randint(1, vocab, (args.batch, args.prompt), generator=g).to(device)

    def run(n):
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                                 eos_token_id=None)
        _sync(device)
        assert out.shape[1] == args.prompt + n
        return time.perf_counter() - t

    for _ in range(args.warmup):
        run(args.new)
    total = statistics.median(run(args.new) for _ in range(args.iters))
    pre = statistics.median(run(1) for _ in range(args.iters))
    return {"total_s": total, "prefill_s": pre,
            "decode_tokens_per_s": args.batch * (args.new - 1) / max(total - pre, 1e-9),
            "end_to_end_tokens_per_s": args.batch * args.new / total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "decode"])
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rec = (train if args.what == "train" else decode)(args, device, dtype)
    rec.update(torch=torch.__version__, device=str(device), dtype=args.dtype, shape=args.shape)
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
