"""Tiny models for tests: one config per layout, with weights that exercise every parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtrl_jax.models import CausalLM, LoRAConfig, ModelConfig, RopeScaling

LAYOUTS = {
    "llama": ModelConfig(
        model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=False, o_bias=False,
        rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64)),
    "qwen2": ModelConfig(
        model_type="qwen2", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=1, head_dim=16, qkv_bias=True, rope_theta=1e6),
    "qwen3": ModelConfig(
        model_type="qwen3", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=24, qkv_bias=False, qk_norm=True,
        tie_word_embeddings=True),
}


def perturbed_model(cfg: ModelConfig, lora: LoRAConfig | None = None, seed: int = 0,
                    scale: float = 0.3) -> CausalLM:
    """A model whose every weight (norms, biases and LoRA ``B`` included) is random."""
    model = CausalLM(cfg, lora, rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) / (x.shape[0] ** 0.5 if x.ndim > 1
           else 1.0) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def full_logprobs(model: CausalLM, tokens, positions=None, segment_ids=None, use_lora=True):
    """Reference log-probs via the full [B, L, V] softmax, aligned like token_logprobs."""
    logits = model(tokens, positions, segment_ids, use_lora=use_lora)
    lp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))
