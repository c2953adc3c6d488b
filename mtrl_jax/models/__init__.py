"""The policy model: a Flax NNX decoder for Llama / Qwen2 / Qwen3 checkpoints, with LoRA."""

from mtrl_jax.models.checkpoint import (
    export_peft_adapter,
    load_model,
    merge_lora,
    save_model,
)
from mtrl_jax.models.config import ModelConfig, RopeScaling
from mtrl_jax.models.lora import LoRAConfig, lora_state_dict, split_lora
from mtrl_jax.models.transformer import CausalLM, KVCache, init_cache

__all__ = [
    "CausalLM",
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "RopeScaling",
    "export_peft_adapter",
    "init_cache",
    "load_model",
    "lora_state_dict",
    "merge_lora",
    "save_model",
    "split_lora",
]
