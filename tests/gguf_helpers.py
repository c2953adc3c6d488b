"""Tiny GGUF files written with the ``gguf`` package's writer, the way llama.cpp's converter lays
them out (q/k rows of llama interleaved for its RoPE, 1-D tensors in F32), together with the HF
folder they came from.

Quantization is lossy, so the HF folder holds the weights the GGUF file can represent: each
2-D weight ``W`` is replaced by what its stored form dequantizes to. A loader that reads the GGUF
file right reproduces that folder's logits to float32 rounding.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtrl_jax.models import ModelConfig

QT = gguf.GGMLQuantizationType
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                 "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "I'm sure it's fine; we'll see, they've said. Don't worry!",
    "def add(a, b):\n    return a + b  # 42\n\n\nprint(add(17, 25))",
    "Café naïve résumé — 日本語のテキスト, emojis 🙂🚀 and tabs\tand   spaces.",
    "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>",
] * 20

# byte positions of the float16 scale fields inside one block of each K-quant (ggml's layout)
_K_QUANT_F16 = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2),
                QT.Q6_K: (208,)}
K_QUANTS = tuple(_K_QUANT_F16)


def hf_to_gguf_rows(n: int, n_heads: int) -> np.ndarray:
    """Row order of llama.cpp's q/k layout: stored row ``r`` is HF row ``order[r]`` (per head,
    the first and second rotary halves interleaved pairwise). Written independently of
    :func:`mtrl_jax.models.gguf.permute_qk`."""
    hd = n // n_heads
    order = []
    for h in range(n_heads):
        for i in range(hd // 2):
            order += [h * hd + i, h * hd + hd // 2 + i]
    return np.asarray(order)


def train_tokenizer(vocab_size: int = 320) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE trained on :data:`CORPUS`: (tokens, merges, llama.cpp token types)."""
    # plain GPT-2 splitting while training: merges across digits exist, so pre-tokenizers
    # that split numbers differently (SmolLM: single digits, Llama 3: up to 3) encode differently
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIAL else 1 for t in tokens]
    return tokens, merges, types


def _stored(arr: np.ndarray, qtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, what it dequantizes to) for a 2-D weight in ggml row order."""
    if qtype == QT.F32:
        return arr.astype(np.float32), arr.astype(np.float32)
    if qtype in K_QUANTS:  # gguf cannot quantize these: random blocks with sane scales
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = arr.shape
        raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
        for off in _K_QUANT_F16[qtype]:
            scale = rng.uniform(0.002, 0.01, (rows, cols // block)).astype(np.float16)
            raw[..., off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(arr.astype(np.float32), qtype)
    return raw, np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(arr.shape)


def write_tiny_gguf(cfg: ModelConfig, path: str, hf_dir: str, *, qtype=QT.F32, seed: int = 0,
                    pre: str = "smollm", quantize_embeddings: bool = True) -> ModelConfig:
    """Write a random model of ``cfg``'s layout as ``path`` (GGUF) and ``hf_dir`` (the HF folder
    of the weights the file represents). The vocabulary comes from :func:`train_tokenizer`; the
    returned config has its size."""
    rng = np.random.default_rng(seed)
    tokens, merges, types = train_tokenizer()
    cfg = cfg.replace(vocab_size=len(tokens), bos_token_id=1, eos_token_id=2)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_heads * hd, cfg.num_kv_heads * hd

    def w(*shape):
        return rng.normal(0, 1 / np.sqrt(shape[-1]), shape).astype(np.float32)

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(cfg.vocab_size, h),
                                 "model.norm.weight": 1 + 0.2 * w(h)}
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = w(cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        hf[p + "input_layernorm.weight"] = 1 + 0.2 * w(h)
        hf[p + "post_attention_layernorm.weight"] = 1 + 0.2 * w(h)
        hf[p + "self_attn.q_proj.weight"] = w(nq, h)
        hf[p + "self_attn.k_proj.weight"] = w(nkv, h)
        hf[p + "self_attn.v_proj.weight"] = w(nkv, h)
        hf[p + "self_attn.o_proj.weight"] = w(h, nq)
        hf[p + "mlp.gate_proj.weight"] = w(i, h)
        hf[p + "mlp.up_proj.weight"] = w(i, h)
        hf[p + "mlp.down_proj.weight"] = w(h, i)
        if cfg.qkv_bias:
            for k, m in (("q", nq), ("k", nkv), ("v", nkv)):
                hf[p + f"self_attn.{k}_proj.bias"] = 0.3 * w(m)
        if cfg.qk_norm:
            hf[p + "self_attn.q_norm.weight"] = 1 + 0.2 * w(hd)
            hf[p + "self_attn.k_norm.weight"] = 1 + 0.2 * w(hd)

    arch = cfg.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(i)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if cfg.rope_scaling is not None:
        from mtrl_jax.models.rope import rope_frequencies

        assert cfg.rope_scaling.rope_type == "llama3", "the helper writes llama3 scaling only"
        plain, _ = rope_frequencies(cfg.replace(rope_scaling=None))
        scaled, _ = rope_frequencies(cfg)
        writer.add_tensor("rope_freqs.weight", (plain / scaled).astype(np.float32))

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight":
             "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight":
             "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight"}
    for name in list(hf):
        if name in names:
            gname = names[name]
        else:
            n, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{n}.{layer[rest]}"
        arr = hf[name]
        order = None
        if arch == "llama" and ".q_proj." in name:
            order = hf_to_gguf_rows(arr.shape[0], cfg.num_heads)
        elif arch == "llama" and ".k_proj." in name:
            order = hf_to_gguf_rows(arr.shape[0], cfg.num_kv_heads)
        stored_order = arr[order] if order is not None else arr
        quantize = arr.ndim == 2 and (quantize_embeddings or "embed" not in name)
        if quantize:
            raw, deq = _stored(stored_order, qtype, rng)
            # uint8 blocks: the writer reads the element shape from the byte shape
            writer.add_tensor(gname, raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
        else:
            deq = stored_order
            writer.add_tensor(gname, stored_order.astype(np.float32))
        back = np.empty_like(deq)
        if order is not None:
            back[order] = deq
        else:
            back = deq
        hf[name] = back.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    os.makedirs(hf_dir, exist_ok=True)
    save_file(hf, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    return cfg
