"""Parity with transformers' PyTorch models and PEFT (needs torch==2.13.0 and peft; CI installs
both with the `parity` extra). Every weight is random -- norms, biases and LoRA B included."""

import numpy as np
import peft
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mtrl_jax.models import (
    LoRAConfig,
    ModelConfig,
    RopeScaling,
    export_peft_adapter,
    load_model,
    merge_lora,
    save_model,
)
from mtrl_jax.models.rope import rope_frequencies
from tests.model_helpers import LAYOUTS, perturbed_model

TOL = 1e-4
LORA = LoRAConfig(rank=4, alpha=8.0)
ROPE_VARIANTS = {
    "llama3": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    "yarn": RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32),
    "linear": RopeScaling("linear", factor=2.0),
}


def hf_logits(model_dir, tokens, adapter_dir=None):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def tokens_for(cfg, length=72, seed=0):
    # longer than the llama3/yarn original context (32) so the scaled frequencies matter
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, length))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_match_transformers(tmp_path, layout):
    model = perturbed_model(LAYOUTS[layout])
    save_model(model, tmp_path)
    tokens = tokens_for(model.cfg)
    ours = np.asarray(model(tokens))
    theirs = hf_logits(tmp_path, tokens)
    assert np.abs(ours).max() > 1.0  # the check is not vacuous
    assert np.abs(ours - theirs).max() < TOL


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scalings_match_transformers(tmp_path, variant):
    cfg = LAYOUTS["qwen2"].replace(rope_scaling=ROPE_VARIANTS[variant],
                                   max_position_embeddings=128)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    want, want_scale = ROPE_INIT_FUNCTIONS[variant](hf_cfg, "cpu")
    got, got_scale = rope_frequencies(cfg)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert got_scale == pytest.approx(want_scale)
    model = perturbed_model(cfg)
    save_model(model, tmp_path)
    tokens = tokens_for(cfg)
    assert np.abs(np.asarray(model(tokens)) - hf_logits(tmp_path, tokens)).max() < TOL


def test_loads_what_transformers_writes_sharded(tmp_path):
    hf_cfg = transformers.Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p) / (p.shape[0] ** 0.5 if p.ndim > 1 else 1.0))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    assert ours.cfg.model_type == "qwen3" and ours.cfg.qk_norm
    tokens = tokens_for(ours.cfg, 24)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours(tokens)) - theirs).max() < TOL


@pytest.mark.parametrize("layout,targets", [("llama", LORA.targets), ("qwen2", LORA.targets),
                                            ("qwen3", ("q", "v", "down"))])
def test_peft_adapter_and_merged_checkpoint_reproduce_our_logits(tmp_path, layout, targets):
    model = perturbed_model(LAYOUTS[layout], LoRAConfig(rank=4, alpha=8.0, targets=targets))
    tokens = tokens_for(model.cfg, 20)
    ours = np.asarray(model(tokens))
    assert np.abs(ours - np.asarray(model(tokens, use_lora=False))).max() > 1e-2
    save_model(model, tmp_path / "base")
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    theirs = hf_logits(tmp_path / "base", tokens, adapter_dir=tmp_path / "adapter")
    assert np.abs(ours - theirs).max() < TOL
    save_model(merge_lora(model), tmp_path / "merged")
    assert np.abs(ours - hf_logits(tmp_path / "merged", tokens)).max() < TOL


def test_config_roundtrip_through_transformers():
    for cfg in LAYOUTS.values():
        hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
        assert ModelConfig.from_hf(hf.to_dict()) == cfg
