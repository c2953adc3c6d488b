"""GGUF checkpoints (llama.cpp's single-file format) read as HF checkpoints.

A ``.gguf`` file holds the weights (often quantized), the architecture's hyper-parameters, the
tokenizer (vocabulary, merges, special tokens) and usually the chat template. This module reads
it with the ``gguf`` package from PyPI and presents it the way an HF directory would be:

- :class:`GGUFCheckpoint` gives an HF ``config.json`` dict (:meth:`~GGUFCheckpoint.hf_config`),
  the tensors under their HF names, dequantized to float32 (:meth:`~GGUFCheckpoint.get`), and a
  ``transformers`` fast tokenizer with the chat template (:meth:`~GGUFCheckpoint.tokenizer`);
  :func:`mtrl_jax.models.load_model` and :func:`mtrl_jax.models.tokenizer.load_tokenizer`
  accept a ``.gguf`` path through it.
- :func:`convert_gguf` (``mtrl convert model.gguf out_dir/``) writes an HF folder --
  ``config.json``, ``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json`` (chat
  template included) and ``generation_config.json`` -- that transformers and this project's
  loader both read.

Supported: architectures ``llama``, ``qwen2``, ``qwen3``; tensor types F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K-Q6_K (dequantized by ``gguf.quants``); tokenizer
model ``gpt2`` (byte-level BPE) with the pre-tokenizers of GPT-2, SmolLM, Llama 3 and Qwen2.
Anything else fails with an error that names it.

llama.cpp's converter stores the ``llama`` architecture's q/k projection rows interleaved for
its RoPE kernel (per head, the two rotary halves are interleaved pairwise); :func:`unpermute_qk`
puts them back in HF's half-split order. Qwen2/Qwen3 files are stored unpermuted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# tensor types whose dequantization we accept (gguf.quants implements each)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF block tensor -> HF tensor (inside ``model.layers.N.``)
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# carried by the file but not weights of the HF layout
_IGNORED_TENSORS = ("rope_freqs.weight",)

# byte-level BPE pre-tokenizers by ``tokenizer.ggml.pre``. Each regex is the split of that
# model family's HF tokenizer.json, written here from the published descriptions.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")

# llama.cpp token types
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """A GGUF file this project cannot read; the message names the offending part."""


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file that starts with the GGUF magic (whatever its name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split rotary rows -> llama.cpp's interleaved rows (what its converter writes)."""
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: llama.cpp's q/k rows back in HF's order."""
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ImportError("reading .gguf files needs the 'gguf' package (pip install gguf)") from e
    return gguf


class GGUFCheckpoint:
    """One ``.gguf`` file, read lazily (memory-mapped); tensors come out in HF names and layout.

    The same reading interface as :class:`mtrl_jax.models.checkpoint.SafetensorsDir`:
    :meth:`names`, :meth:`shape`, :meth:`get`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        if not is_gguf(self.path):
            raise GGUFError(f"{self.path}: not a GGUF file (no GGUF magic)")
        gguf = _gguf()
        self.reader = gguf.GGUFReader(self.path, "r")
        self.arch = self.field("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{self.path}: unsupported GGUF architecture {self.arch!r}; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._hf_to_gguf: dict[str, str] = {}
        unknown = []
        for name in self._tensors:
            hf = self._hf_name(name)
            if hf is None:
                if name not in _IGNORED_TENSORS:
                    unknown.append(name)
                continue
            self._hf_to_gguf[hf] = name
        if unknown:
            raise GGUFError(f"{self.path}: tensor(s) with no place in the {self.arch} layout: "
                            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        bad = sorted({(n, t.tensor_type.name) for n, t in self._tensors.items()
                      if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES})
        if bad:
            kinds = sorted({k for _, k in bad})
            raise GGUFError(f"{self.path}: unsupported tensor type(s) {kinds} (e.g. tensor "
                            f"{bad[0][0]!r}); supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
        self._config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ metadata

    _MISSING = object()

    def field(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value (strings decoded, arrays as lists)."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is GGUFCheckpoint._MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return f.contents()

    def _arch_field(self, key: str, default: Any = _MISSING) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    @staticmethod
    def _hf_name(name: str) -> str | None:
        if name in _TOP_NAMES:
            return _TOP_NAMES[name]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m and m.group(2) in _BLOCK_NAMES:
            return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
        return None

    def hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict of this file's model."""
        if self._config is not None:
            return dict(self._config)
        from mtrl_jax.models.config import ModelConfig

        heads = int(self._arch_field("attention.head_count"))
        hidden = int(self._arch_field("embedding_length"))
        emb = self._tensors["token_embd.weight"]
        vocab = int(emb.shape[1])  # ggml order: [hidden, vocab]
        head_dim = int(self._arch_field("attention.key_length", hidden // heads))
        value_dim = int(self._arch_field("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise GGUFError(f"{self.path}: key length {head_dim} != value length {value_dim} "
                            "is not supported")
        rope_dims = int(self._arch_field("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise GGUFError(f"{self.path}: partial rotary embeddings (rope.dimension_count "
                            f"{rope_dims} of head dim {head_dim}) are not supported")
        bias = "blk.0.attn_q.bias" in self._tensors
        hf: dict[str, Any] = {
            "model_type": self.arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch_field("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_field("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": bias,
            "mlp_bias": "blk.0.ffn_up.bias" in self._tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id", None),
        }
        if self.arch == "qwen2" and not bias:
            raise GGUFError(f"{self.path}: a qwen2 file without q/k/v biases")
        rope = self._rope_scaling()
        if rope is not None:
            hf["rope_scaling"] = rope
        # ModelConfig validates (and normalises) the result the same way as a config.json
        self._config = ModelConfig.from_hf(hf).to_hf_dict()
        return dict(self._config)

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch_field("rope.scaling.type", "none")
        if "rope_freqs.weight" in self._tensors:
            if kind not in ("none", "llama3"):
                raise GGUFError(f"{self.path}: rope_freqs with rope scaling {kind!r}")
            return self._llama3_scaling()
        if kind in ("none", None):
            return None
        factor = float(self._arch_field("rope.scaling.factor"))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            orig = int(self._arch_field("rope.scaling.original_context_length"))
            return {"rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": orig}
        raise GGUFError(f"{self.path}: unsupported rope scaling type {kind!r} "
                        "(supported: linear, yarn, llama3 via rope_freqs)")

    def _llama3_scaling(self) -> dict[str, Any]:
        """Llama 3.1+ stores the per-frequency RoPE divisors as a tensor, not the parameters;
        recover the parameters by matching the divisors against Llama 3's published settings."""
        from mtrl_jax.models.config import ModelConfig
        from mtrl_jax.models.rope import rope_frequencies

        t = self._tensors["rope_freqs.weight"]
        divisors = np.asarray(_gguf().quants.dequantize(t.data, t.tensor_type), np.float64)
        heads = int(self._arch_field("attention.head_count"))
        hidden = int(self._arch_field("embedding_length"))
        head_dim = int(self._arch_field("attention.key_length", hidden // heads))
        theta = float(self._arch_field("rope.freq_base", 10000.0))
        base = ModelConfig(model_type="llama", head_dim=head_dim, rope_theta=theta)
        plain, _ = rope_frequencies(base)
        factor = float(divisors.max())
        orig_ctx = self._arch_field("rope.scaling.original_context_length", None)
        for orig in ([int(orig_ctx)] if orig_ctx else [2 ** k for k in range(6, 18)]):
            for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
                params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                          "high_freq_factor": high, "original_max_position_embeddings": orig}
                cand = ModelConfig.from_hf({
                    "model_type": "llama", "vocab_size": 8, "hidden_size": heads * head_dim,
                    "intermediate_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": heads, "head_dim": head_dim, "rope_theta": theta,
                    "rope_scaling": params})
                inv, _ = rope_frequencies(cand)
                if np.allclose(plain / np.asarray(inv, np.float64), divisors, rtol=1e-4):
                    return params
        raise GGUFError(f"{self.path}: rope_freqs does not match Llama 3's rope scaling for any "
                        "known setting; this file's RoPE scaling is not supported")

    # ------------------------------------------------------------------ tensors

    def names(self) -> set[str]:
        return set(self._hf_to_gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[self._hf_to_gguf[name]].shape))

    def get(self, name: str) -> np.ndarray:
        """The HF tensor ``name`` as float32 (dequantized; q/k rows un-permuted for llama)."""
        t = self._tensors[self._hf_to_gguf[name]]
        arr = np.asarray(_gguf().quants.dequantize(t.data, t.tensor_type), np.float32)
        arr = arr.reshape(self.shape(name))
        if self.arch == "llama":
            cfg = self.hf_config()
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                arr = unpermute_qk(arr, cfg["num_attention_heads"])
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                arr = unpermute_qk(arr, cfg["num_key_value_heads"])
        return arr

    def tensor_types(self) -> dict[str, str]:
        """HF name -> the GGUF storage type (``Q4_1``, ``F32``, ...)."""
        return {hf: self._tensors[g].tensor_type.name for hf, g in self._hf_to_gguf.items()}

    # ------------------------------------------------------------------ tokenizer

    def tokenizer(self):
        """A ``transformers`` fast tokenizer built from the file's vocabulary, merges, special
        tokens and chat template (no network, no torch)."""
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            processors,
        )
        from transformers import PreTrainedTokenizerFast

        kind = self.field("tokenizer.ggml.model", None)
        if kind != "gpt2":
            raise GGUFError(f"{self.path}: unsupported tokenizer model {kind!r}; supported: "
                            "'gpt2' (byte-level BPE)")
        pre = self.field("tokenizer.ggml.pre", "default")
        if pre not in SUPPORTED_PRE_TOKENIZERS:
            raise GGUFError(f"{self.path}: unsupported pre-tokenizer {pre!r}; supported: "
                            f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
        tokens = list(self.field("tokenizer.ggml.tokens"))
        types = list(self.field("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges", [])]
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe",
                                                                              "llama3"))
        tok = Tokenizer(model)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            split = _LLAMA3_SPLIT if pre != "qwen2" else _QWEN2_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = byte_level
        if pre == "qwen2":
            from tokenizers import normalizers

            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        special, added = [], []
        for i, (t, ty) in enumerate(zip(tokens, types, strict=False)):
            if vocab.get(t) != i:
                continue
            if ty == _TOKEN_CONTROL:
                special.append(AddedToken(t, special=True, normalized=False))
            elif ty == _TOKEN_USER_DEFINED:
                added.append(AddedToken(t, special=False, normalized=False))
        tok.add_special_tokens(special)
        if added:
            tok.add_tokens(added)

        def token(key: str) -> str | None:
            i = self.field(f"tokenizer.ggml.{key}_token_id", None)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos = token("bos")
        if self.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, vocab[bos])])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kw = {k: v for k, v in (("bos_token", bos), ("eos_token", token("eos")),
                                ("unk_token", token("unknown")), ("pad_token", token("padding")))
              if v is not None}
        out = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                      **kw)
        template = self.field("tokenizer.chat_template", None)
        if template:
            out.chat_template = template
        return out


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32", progress: bool = False) -> str:
    """Write the HF folder of a GGUF file: ``config.json``, ``model.safetensors`` (dequantized to
    ``dtype``), the tokenizer with its chat template, ``generation_config.json``.

    Returns ``out_dir``. ``dtype``: ``float32`` (exact dequantized values), ``bfloat16`` or
    ``float16``.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    ck = GGUFCheckpoint(path)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cfg = ck.hf_config()
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    tok = ck.tokenizer()  # before writing anything: an unsupported tokenizer fails early
    tensors = {}
    names = sorted(ck.names())
    for i, name in enumerate(names):
        arr = ck.get(name)
        if dtype == "bfloat16":
            import ml_dtypes

            arr = arr.astype(ml_dtypes.bfloat16)
        elif dtype == "float16":
            arr = arr.astype(np.float16)
        tensors[name] = np.ascontiguousarray(arr)
        if progress and (i + 1) % 50 == 0:
            print(f"  dequantized {i + 1}/{len(names)} tensors", flush=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    pad = ck.field("tokenizer.ggml.padding_token_id", None)
    if pad is not None:
        gen["pad_token_id"] = int(pad)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    tok.save_pretrained(out_dir)
    return out_dir
