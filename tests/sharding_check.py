"""Run in a subprocess with 8 simulated CPU devices (see test_sharding.py): the forward, the
log-probs and a LoRA gradient step under jax.jit + NamedSharding on a (2, 2, 2) mesh versus one
device. Prints one JSON line of results."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtrl_jax.models import LoRAConfig, load_model, save_model, split_lora
from mtrl_jax.models.logprobs import token_logprobs
from mtrl_jax.models.sharding import (
    batch_sharding,
    loader_shardings,
    make_mesh,
    shard_model,
)
from mtrl_jax.training.lora_step import make_lora_train_step
from tests.model_helpers import LAYOUTS, perturbed_model
from tests.packed_data import pack, scatter


def main():
    cfg = LAYOUTS[sys.argv[1] if len(sys.argv) > 1 else "qwen2"].replace(num_kv_heads=2)
    lora = LoRAConfig(rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    lengths = [9, 5, 12, 7, 3, 10, 6, 8, 4, 11]
    seg, placement, _ = pack(lengths, 8, 16)
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    batch = dict(
        tokens=jnp.asarray(scatter(placement, seqs, 8, 16, dtype=np.int32)),
        positions=jnp.asarray(scatter(placement, [np.arange(n) for n in lengths], 8, 16,
                                      dtype=np.int32)),
        segment_ids=jnp.asarray(seg),
        adv=jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32)),
    )

    def loss_fn(model, b):
        st = token_logprobs(model, b["tokens"], b["positions"], b["segment_ids"], chunk_size=32)
        mask = (b["segment_ids"] > 0).astype(jnp.float32)
        return -jnp.sum(st.logprobs * b["adv"] * mask) / jnp.sum(mask), {"lp": st.logprobs}

    tx = optax.sgd(0.5)
    results = {}
    mesh = make_mesh(2, 2, 2)
    for mode in ("single", "sharded"):
        model = perturbed_model(cfg, lora)
        b = batch
        if mode == "sharded":
            shard_model(model, mesh)
            b = jax.device_put(batch, batch_sharding(mesh))
        graphdef, lora_p, base = split_lora(model)
        fwd = jax.jit(lambda lo, ba, t, gd=graphdef: nnx.merge(gd, lo, ba)(t))
        logits = fwd(lora_p, base, b["tokens"])
        step = make_lora_train_step(graphdef, tx, loss_fn)
        lora_p, _, loss, aux, gnorm = step(lora_p, tx.init(lora_p), base, b)
        results[mode] = dict(logits=np.asarray(logits), lp=np.asarray(aux["lp"]),
                             loss=float(loss), gnorm=float(gnorm),
                             lora=[np.asarray(x) for x in jax.tree.leaves(lora_p)])
        if mode == "sharded":
            q = base["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
            a = lora_p["layers"][0]["mlp"]["down_proj"]["lora_a"].get_value()
            results["specs"] = [str(q.sharding.spec), str(a.sharding.spec),
                                str(logits.sharding.spec)]
            results["q_shards"] = len({d.id for d in q.sharding.device_set})
            results["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
            results["q_shape"] = list(q.shape)

    # a checkpoint loaded straight onto the mesh gives the same logits
    with tempfile.TemporaryDirectory() as d:
        model = perturbed_model(cfg)
        save_model(model, d)
        loaded = load_model(d, shardings=loader_shardings(mesh))
        emb = loaded.embed_tokens.get_value()
        load_diff = float(np.abs(np.asarray(loaded(batch["tokens"]))
                                 - np.asarray(model(batch["tokens"]))).max())
        results["loaded_embed_spec"] = str(emb.sharding.spec)

    s, p = results["single"], results["sharded"]
    print(json.dumps(dict(
        devices=len(jax.devices()),
        logits_diff=float(np.abs(s["logits"] - p["logits"]).max()),
        logprob_diff=float(np.abs(s["lp"] - p["lp"]).max()),
        loss=[s["loss"], p["loss"]], gnorm=[s["gnorm"], p["gnorm"]],
        lora_diff=max(float(np.abs(x - y).max()) for x, y in zip(s["lora"], p["lora"],
                                                                  strict=True)),
        lora_moved=max(float(np.abs(x).max()) for x in s["lora"]),
        specs=results["specs"], q_shards=results["q_shards"],
        q_shard_shape=results["q_shard_shape"], q_shape=results["q_shape"], load_diff=load_diff,
        loaded_embed_spec=results["loaded_embed_spec"],
    )))


if __name__ == "__main__":
    main()
