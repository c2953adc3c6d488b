"""The blockwise Pallas attention (mtrl_jax/models/flash_attention.py), in interpret mode on CPU,
against the XLA path (``attend`` with ``packed_mask``): outputs and gradients on packed rows with
shared-prefix trees, grouped heads, padded head dims and rows; the block-skipping bounds against
the dense mask; the model and the recipe switch; the ``auto`` settings per backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtrl_jax.config import load_config
from mtrl_jax.models import ModelConfig
from mtrl_jax.models.accelerator import resolve_attention, resolve_dtype
from mtrl_jax.models.flash_attention import _bounds, flash_attention, shard_axes
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.models.lora import LoRAConfig
from mtrl_jax.models.transformer import CausalLM, attend, packed_mask


def random_rows(rng, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows: groups of a prefix segment and 1-3 children continuing it (tree packing),
    plain segments, then padding; segment ids count up from 1 per row."""
    seg = np.zeros((b, n), np.int32)
    par = np.zeros((b, n), np.int32)
    for r in range(b):
        pos, sid = 0, 1
        while pos < n - 4 and rng.random() < 0.9:
            if rng.random() < 0.5:  # a group: prefix + children
                length = int(rng.integers(2, 12))
                seg[r, pos:pos + length] = sid
                prefix, pos, sid = sid, pos + length, sid + 1
                for _ in range(int(rng.integers(1, 4))):
                    length = int(rng.integers(1, 10))
                    seg[r, pos:pos + length] = sid
                    par[r, pos:pos + length] = prefix
                    pos, sid = min(pos + length, n), sid + 1
            else:
                length = int(rng.integers(1, 20))
                seg[r, pos:pos + length] = sid
                pos, sid = min(pos + length, n), sid + 1
        par[r][seg[r] == 0] = 0
    return seg, par


@pytest.mark.parametrize("seed", range(4))
def test_bounds_are_the_first_visible_key_and_the_last_seeing_query(seed):
    seg, par = random_rows(np.random.default_rng(seed), 3, 90)
    mask = np.asarray(packed_mask(jnp.asarray(seg), jnp.asarray(par)))
    first, last = jax.vmap(_bounds)(jnp.asarray(seg), jnp.asarray(par))
    first, last = np.asarray(first), np.asarray(last)
    for r in range(seg.shape[0]):
        for i in np.nonzero(seg[r])[0]:
            assert first[r, i] == np.nonzero(mask[r, i])[0].min()  # itself at least
            assert last[r, i] == np.nonzero(mask[r, :, i])[0].max()


def _inputs(rng, b, n, h, kv, d, dtype=jnp.float32):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)
    return normal(b, n, h, d), normal(b, n, kv, d), normal(b, n, kv, d), normal(b, n, h, d)


@pytest.mark.parametrize("seed,h,kv,d,n,blocks", [
    (0, 4, 2, 32, 80, (16, 16)),   # grouped heads, rows a multiple of the blocks
    (1, 2, 2, 24, 77, (16, 32)),   # no grouping, padded head dim and row, unequal blocks
    (2, 6, 2, 16, 50, (32, 16)),   # 3 query heads per key head
])
def test_outputs_and_gradients_equal_the_xla_path(seed, h, kv, d, n, blocks):
    rng = np.random.default_rng(seed)
    seg, par = random_rows(rng, 2, n)
    q, k, v, w = _inputs(rng, 2, n, h, kv, d)
    seg_j, par_j = jnp.asarray(seg), jnp.asarray(par)
    w = w * jnp.asarray(seg > 0)[:, :, None, None]  # padding queries' outputs are not used

    def xla(q, k, v):
        return attend(q, k, v, packed_mask(seg_j, par_j))

    def ours(q, k, v):
        return flash_attention(q, k, v, seg_j, par_j, block_q=blocks[0], block_k=blocks[1])

    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(ours(q, k, v)) * real, np.asarray(xla(q, k, v)) * real,
                               atol=2e-6, rtol=1e-5)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
             for f in (xla, ours)]
    for name, ref, got in zip("qkv", *grads, strict=True):
        rel = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        assert rel < 1e-5, (name, rel)
    # padding queries see nothing: their output is 0, and with tree rows every query of a
    # child segment sees its prefix (not a no-op mask)
    assert float(jnp.max(jnp.abs(ours(q, k, v) * (1 - real)))) == 0.0
    assert (par > 0).any()


def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    rng = np.random.default_rng(5)
    seg, par = random_rows(rng, 1, 64)
    q, k, v, _ = _inputs(rng, 1, 64, 4, 2, 32)
    ref = attend(q, k, v, packed_mask(jnp.asarray(seg), jnp.asarray(par)))
    got = flash_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                          jnp.asarray(seg), jnp.asarray(par), block_q=16, block_k=16)
    assert got.dtype == jnp.bfloat16
    real = (seg > 0)[:, :, None, None]
    err = np.max(np.abs(np.asarray(got.astype(jnp.float32)) - np.asarray(ref)) * real)
    assert err < 0.05, err


def test_bad_inputs_are_refused():
    q = jnp.zeros((1, 32, 4, 16))
    k = jnp.zeros((1, 32, 3, 16))
    with pytest.raises(ValueError, match="multiple of KV"):
        flash_attention(q, k, k, jnp.ones((1, 32), jnp.int32))
    with pytest.raises(ValueError, match="power of 2"):
        flash_attention(q, q, q, jnp.ones((1, 32), jnp.int32), block_q=24)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        flash_attention(q, q, q, jnp.ones((1, 31), jnp.int32))
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash")


def test_the_model_with_the_kernel_gives_the_same_logprobs_and_lora_gradients():
    """A tiny model's packed forward (tree rows) and the LoRA gradient of the summed
    log-probs under ``attention="pallas"`` equal the XLA path's."""
    base = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    lora = LoRAConfig(rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    seg, par = random_rows(rng, 2, 48)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 48)))
    positions = jnp.asarray(np.tile(np.arange(48), (2, 1)))
    results = []
    for impl in ("xla", "pallas"):
        model = CausalLM(ModelConfig(**base, attention=impl), lora, rngs=nnx.Rngs(3))
        # non-zero B so that the adapters matter in the forward too
        for path, x in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            x.set_value(jnp.asarray(np.random.default_rng(len(path)).normal(
                0, 0.05, x.shape), jnp.float32))
        graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(lora_state, graphdef=graphdef, rest=rest):
            m = nnx.merge(graphdef, lora_state, rest)
            lp = token_logprobs(m, tokens, positions=positions, segment_ids=jnp.asarray(seg),
                                parent_ids=jnp.asarray(par)).logprobs
            return jnp.sum(lp * (jnp.asarray(seg) > 0)), lp

        (value, lp), grads = jax.value_and_grad(loss, has_aux=True)(lora_state)
        results.append((value, np.asarray(lp) * (seg > 0), grads))
    (v1, lp1, g1), (v2, lp2, g2) = results
    assert abs(float(v2) - float(v1)) <= 1e-5 * abs(float(v1))
    np.testing.assert_allclose(lp2, lp1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(float(jnp.max(jnp.abs(a))), 1e-6)


def test_auto_settings_per_backend():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "gpu") == resolve_dtype("auto", "tpu") == "bfloat16"
    assert resolve_dtype("float16", "gpu") == "float16"
    assert resolve_attention("auto", "cpu") == resolve_attention("auto", "tpu") == "xla"
    assert resolve_attention("pallas", "cpu") == "pallas"
    cfg = load_config(None, ["model.attention=pallas"])
    assert cfg.model.attention == "pallas" and cfg.model.dtype == "auto"
    with pytest.raises(ValueError, match="attention"):
        load_config(None, ["model.attention=flash"])


def test_the_kernel_runs_under_the_tpu_interpreter():
    """Pallas's TPU interpret mode (blocks copied through simulated TPU memory spaces) gives the
    XLA path's outputs and gradients. Mosaic's own lowering needs a TPU and is not checked."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(7)
    seg, par = random_rows(rng, 1, 64)
    q, k, v, w = _inputs(rng, 1, 64, 4, 2, 32)
    w = w * jnp.asarray(seg > 0)[:, :, None, None]
    seg_j, par_j = jnp.asarray(seg), jnp.asarray(par)

    def tpu(q, k, v):
        return flash_attention(q, k, v, seg_j, par_j, block_q=16, block_k=16,
                               interpret=pltpu.InterpretParams())

    def xla(q, k, v):
        return attend(q, k, v, packed_mask(seg_j, par_j))

    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
             for f in (tpu, xla)]
    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(tpu(q, k, v)) * real, np.asarray(xla(q, k, v)) * real,
                               atol=2e-6, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5


def test_shard_axes_split_rows_and_heads_only_where_they_divide():
    """Under a mesh the kernel's rows go over ``data`` then ``fsdp`` and its heads over
    ``tensor``, each only where the count divides (the run under a real 4-device mesh is
    ``test_distributed.py::test_the_pallas_kernel_runs_shard_by_shard_on_the_mesh``)."""
    class Mesh:
        def __init__(self, **shape):
            self.shape = shape

    m = Mesh(data=2, fsdp=2, tensor=2)
    assert shard_axes(m, 8, 4, 2) == (("data", "fsdp"), "tensor")
    assert shard_axes(m, 2, 4, 2) == (("data",), "tensor")  # 2 rows: data only
    assert shard_axes(m, 3, 4, 2) == (None, "tensor")
    assert shard_axes(m, 4, 4, 1) == (("data", "fsdp"), None)  # one key head: heads whole
    assert shard_axes(Mesh(data=1, fsdp=4, tensor=1), 4, 7, 1) == (("fsdp",), None)
