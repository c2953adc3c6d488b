"""One update step of the trainer's Updater (the recipe's loss, 2 mini-batches, KL to the
reference, PPO clipping) on a fixed packed batch, run as (see test_distributed.py):

  ref OUT                          1 process, 1 device, unsharded
  mesh OUT                         1 process x 4 CPU devices, mesh data=2 x tensor=2
  multi OUT PROCESS_ID COORDINATOR 2 processes x 2 CPU devices each, the same global mesh

With ``MTRL_CHECK_ATTENTION=pallas`` in the environment the model attends through the Pallas
kernel (interpret mode), which runs under ``jax.shard_map`` on a mesh.

Writes OUT (npz, from process 0): the step's metrics, the LoRA weights after it (gathered
whole), how the LoRA and batch arrays were laid out, and how many times ``jax.shard_map`` was
called while the step traced."""

import os
import sys

MODE = sys.argv[1]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = {"ref": "", "mesh": "--xla_force_host_platform_device_count=4",
                           "multi": "--xla_force_host_platform_device_count=2"}[MODE]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtrl_jax.training import distributed  # noqa: E402

if MODE == "multi":
    info = distributed.initialize(coordinator=sys.argv[4], num_processes=2,
                                  process_id=int(sys.argv[3]), timeout_s=120)

from mtrl_jax.config import load_config  # noqa: E402
from mtrl_jax.models.lora import split_lora  # noqa: E402
from mtrl_jax.models.sharding import make_mesh, shard_model  # noqa: E402
from mtrl_jax.rollout.runner import build_policy  # noqa: E402
from mtrl_jax.training.batch import pack_for_update  # noqa: E402
from mtrl_jax.training.packing import Segment  # noqa: E402
from mtrl_jax.training.update import Updater, make_optimizer  # noqa: E402

OVERRIDES = [
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, "
    "num_kv_heads: 2, head_dim: 8, tie_word_embeddings: false}",
    "lora.lora_rank=4", "rollout.max_context_tokens=64", "packing.row_lengths=[64]",
    "optimizer.learning_rate=5e-2", "optimizer.mini_batches=2", "algorithm.kl_coef=0.05",
    "seed=3", f"model.attention={os.environ.get('MTRL_CHECK_ATTENTION', 'xla')}",
]
SHARD_MAPS = [0]
_shard_map = jax.shard_map


def _counted_shard_map(*args, **kwargs):
    SHARD_MAPS[0] += 1
    return _shard_map(*args, **kwargs)


jax.shard_map = _counted_shard_map


def segments(n: int = 11) -> list[Segment]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        n_ctx, n_ans = int(rng.integers(4, 20)), int(rng.integers(3, 24))
        toks = rng.integers(3, 250, n_ctx + n_ans).astype(np.int32)
        mask = np.r_[np.zeros(n_ctx, np.int8), np.ones(n_ans, np.int8)]
        lp = np.where(mask > 0, rng.uniform(-6, -0.5, n_ctx + n_ans), 0).astype(np.float32)
        out.append(Segment(toks, mask, lp, float(rng.normal()), index=i))
    return out


def main() -> None:
    out_path = sys.argv[2]
    config = load_config(overrides=OVERRIDES)
    _, model = build_policy(config)
    placement = None
    if MODE != "ref":
        mesh = make_mesh(data=2, fsdp=1, tensor=2)
        shard_model(model, mesh)
        placement = distributed.MeshPlacement(mesh)
    graphdef, lora, base = split_lora(model)
    tx, _ = make_optimizer(config)
    update = Updater(graphdef, tx, config, placement=placement)
    batch = pack_for_update(segments(), (64,), row_multiple=1, mini_batches=2)
    new_lora, _, metrics = update(lora, tx.init(lora), base, batch)
    leaves = distributed.gather_tree(jax.tree.leaves(new_lora))
    first = jax.tree.leaves(new_lora)[0]
    if jax.process_index() == 0:
        np.savez(out_path, rows=batch.shape[0], devices=jax.device_count(),
                 processes=jax.process_count(),
                 lora_spec=str(getattr(first.sharding, "spec", "")),
                 lora_local_shards=len(first.addressable_shards), shard_maps=SHARD_MAPS[0],
                 metric_names=np.array(sorted(metrics)),
                 metric_values=np.array([metrics[k] for k in sorted(metrics)]),
                 **{f"lora{i}": x for i, x in enumerate(leaves)})
    if MODE == "multi":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
