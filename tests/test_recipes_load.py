"""Each starter recipe for a real model loads through the path the SmolLM2 tests run on real
weights (a GGUF file or the HF folder `mtrl convert` writes), with its own dtypes: a bfloat16
base, float32 LoRA weights (the optimizer state follows them)."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtrl_jax.config import load_config
from mtrl_jax.models.gguf import convert_gguf
from mtrl_jax.rollout.runner import build_policy
from tests.gguf_helpers import QT, write_tiny_gguf
from tests.model_helpers import LAYOUTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                 if os.path.basename(p).startswith(("qwen", "llama")))
LAYOUT_OF = {"qwen2.5": "qwen2", "qwen3": "qwen3", "llama3.2": "llama"}


def test_every_starter_recipe_is_covered():
    assert len(RECIPES) == 8
    for r in RECIPES:
        assert os.path.basename(r).split("_")[0] in LAYOUT_OF, r


def test_every_starter_recipe_defaults_to_bf16_base_and_compute():
    for r in RECIPES:
        cfg = load_config(r, ["model.path=/x"])
        assert cfg.model.param_dtype == cfg.model.dtype == "bfloat16", r


# one recipe per layout loads real files (the others differ from it in sizes, not in loading)
@pytest.mark.parametrize("recipe", [r for r in RECIPES if os.path.basename(r) in (
    "qwen2.5_0.5b.yaml", "qwen3_0.6b.yaml", "llama3.2_1b.yaml")], ids=os.path.basename)
def test_starter_recipe_loads_gguf_and_converted_folder_in_bf16(tmp_path, recipe):
    layout = LAYOUT_OF[os.path.basename(recipe).split("_")[0]]
    gguf_path = str(tmp_path / "m.gguf")
    write_tiny_gguf(LAYOUTS[layout], gguf_path, str(tmp_path / "src"), qtype=QT.Q8_0)
    folder = convert_gguf(gguf_path, tmp_path / "hf")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (1, 24)))
    outputs = []
    for path in (gguf_path, folder):
        cfg = load_config(recipe, [f"model.path={path}"])
        assert cfg.model.param_dtype == cfg.model.dtype == "bfloat16"
        tok, model = build_policy(cfg)
        assert tok.eos_token == "<|im_end|>" and model.cfg.model_type == layout
        base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
        lora = nnx.state(model, nnx.LoRAParam)
        assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
        assert len(jax.tree.leaves(lora)) == 2 * 7 * model.cfg.num_layers  # every projection
        outputs.append(np.asarray(model(tokens).astype(jnp.float32)))
    np.testing.assert_array_equal(outputs[0], outputs[1])  # GGUF and folder: same weights
    # bf16 against the float32 weights of the same checkpoint: rounding, not a different model
    cfg32 = load_config(recipe, [f"model.path={folder}", "model.dtype=float32",
                                 "model.param_dtype=float32"])
    ref = np.asarray(build_policy(cfg32)[1](tokens))
    assert np.isfinite(outputs[0]).all()
    assert np.abs(outputs[0] - ref).max() < 0.1 * np.abs(ref).max()
    assert (outputs[0].argmax(-1) == ref.argmax(-1)).mean() > 0.8
