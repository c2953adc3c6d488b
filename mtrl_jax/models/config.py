"""The decoder family's configuration: one frozen dataclass for Llama, Qwen2/2.5 and Qwen3.

``ModelConfig.from_hf(path_or_dict)`` reads a Hugging Face ``config.json`` (a local directory,
never a hub download) and maps it onto the fields below; ``to_hf_dict()`` writes it back.

Layout differences the fields capture:

==============  ===========  ===========  =============  =======
layout          qkv bias     o bias       q/k RMSNorm    MLP bias
==============  ===========  ===========  =============  =======
llama           attention_   attention_   no             mlp_bias
                bias         bias
qwen2 / 2.5     yes          no           no             no
qwen3           attention_   attention_   yes            no
                bias         bias
==============  ===========  ===========  =============  =======
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "pallas")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as declared by an HF config (``rope_parameters`` / ``rope_scaling``).

    ``rope_type``: ``default``, ``linear``, ``llama3`` or ``yarn``. The other fields are those
    types' parameters (unused ones stay ``None``).
    """

    rope_type: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; supported: default, linear, llama3, "
                "yarn"
            )
        if self.rope_type != "default" and self.factor is None and self.rope_type != "yarn":
            raise ValueError(f"rope_type {self.rope_type!r} needs 'factor'")
        if self.rope_type == "llama3" and None in (
            self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings
        ):
            raise ValueError(
                "rope_type 'llama3' needs low_freq_factor, high_freq_factor and "
                "original_max_position_embeddings"
            )
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ValueError("rope_type 'yarn' needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer of the Llama/Qwen family.

    Attributes (HF names in brackets where they differ):
      model_type: ``llama``, ``qwen2`` or ``qwen3``.
      vocab_size, hidden_size, intermediate_size: sizes.
      num_layers [num_hidden_layers], num_heads [num_attention_heads],
      num_kv_heads [num_key_value_heads], head_dim: attention shape (GQA when
        ``num_kv_heads < num_heads``).
      rope_theta: RoPE base; rope_scaling: :class:`RopeScaling` or ``None``.
      rms_norm_eps: RMSNorm epsilon.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      qkv_bias, o_bias, mlp_bias, qk_norm: the layout switches (see the module docstring).
      max_position_embeddings: the model's context length (informational; not enforced).
      param_dtype: dtype the weights are stored in; dtype: dtype of activations/matmuls.
        Log-probs and the softmax are always computed in float32.
      attention: the packed forward's attention: ``xla`` (a ``[B, L, L]`` mask, dense scores;
        the reference, fastest on CPU) or ``pallas`` (the blockwise kernel of
        :mod:`mtrl_jax.models.flash_attention`: no score matrix, skips blocks no query sees;
        for accelerators). Decoding is unaffected.
    """

    model_type: Literal["llama", "qwen2", "qwen3"] = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "xla"

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # keep the config hashable (static under jit)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a dtype") from None

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        """Number of parameters (embedding and LM head counted separately unless tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_layers * layer + emb + h + (0 if self.tie_word_embeddings else emb)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF conversion

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any], **overrides) -> ModelConfig:
        """Build from an HF ``config.json`` (a directory, the file, or its parsed dict).

        Unsupported ``model_type`` or features (sliding-window attention, partial rotary,
        unknown rope types) fail with an error naming them. ``overrides`` set fields such as
        ``dtype`` or ``param_dtype``.
        """
        if isinstance(source, dict):
            hf = dict(source)
            where = "config dict"
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no HF config at {path}")
            with open(path) as f:
                hf = json.load(f)
            where = path
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where}: unsupported model_type {model_type!r}; supported: "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        if hf.get("use_sliding_window"):
            raise ValueError(f"{where}: sliding-window attention (use_sliding_window) is not "
                             "supported")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{where}: layer_types other than full_attention are not supported: "
                             f"{sorted(set(layer_types))}")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported "
                             "(only silu / SwiGLU)")

        rope = hf.get("rope_parameters") or {}
        legacy = hf.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        merged = {**legacy, **rope}
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        if rope_type == "dynamic":
            raise ValueError(f"{where}: rope_type 'dynamic' (dynamic NTK) is not supported")
        scaling = None
        if rope_type != "default":
            fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
            kw = {k: merged[k] for k in fields if merged.get(k) is not None}
            scaling = RopeScaling(rope_type=rope_type, **kw)

        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        attention_bias = bool(hf.get("attention_bias", False))
        kw = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict that transformers (and vLLM) load as this model."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items()
                    if v is not None}
            rope["rope_theta"] = self.rope_theta
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(rope)
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        elif self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        return out
