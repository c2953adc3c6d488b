"""Device mesh and partition rules, declared once for base and LoRA parameters.

Mesh axes:

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: data parallelism with parameters sharded along their hidden dimension (ZeRO-3 style;
  XLA all-gathers each weight where it is used);
- ``tensor``: Megatron-style tensor parallelism -- column-parallel q/k/v/gate/up and the LM head
  (output dimension split), row-parallel o/down (input dimension split).

The batch is split over ``("data", "fsdp")``. A dimension that an axis does not divide is left
unsplit on that axis (so a toy model runs on any mesh); :func:`partition_spec` reports which.

Meshes use ``AxisType.Auto`` so that ``jax.jit`` + ``NamedSharding`` propagate shardings (jax
0.10's ``make_mesh`` defaults to Explicit axes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

_COL = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"
_ROW = r"(o_proj|down_proj)"

#: (regex over the '/'-joined state path, spec) -- first match wins. Shapes: kernels [in, out],
#: lora_a [in, r], lora_b [r, out], embed [vocab, hidden], lm_head [hidden, vocab].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed_tokens$", P("tensor", "fsdp")),
    (r"^lm_head$", P("fsdp", "tensor")),
    (rf"/{_COL}/kernel$", P("fsdp", "tensor")),
    (rf"/{_ROW}/kernel$", P("tensor", "fsdp")),
    (rf"/{_COL}/bias$", P("tensor")),
    (rf"/{_ROW}/bias$", P()),
    (rf"/{_COL}/lora_a$", P("fsdp", None)),
    (rf"/{_COL}/lora_b$", P(None, "tensor")),
    (rf"/{_ROW}/lora_a$", P("tensor", None)),
    (rf"/{_ROW}/lora_b$", P(None, "fsdp")),
    (r"(norm|layernorm)/weight$", P()),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one axis may be -1 (= the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes, strict=True))} needs {np.prod(sizes)} "
                         f"devices, have {len(devices)}")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * 3)


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def partition_spec(path, shape: tuple[int, ...], mesh: Mesh,
                   rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> P:
    """The spec for a parameter: the first matching rule, minus axes that do not divide."""
    name = path_str(path)
    match = next(((pat, spec) for pat, spec in rules if re.search(pat, name)), None)
    if match is None:
        return P()
    pattern, spec = match
    if len(spec) > len(shape):
        raise ValueError(f"rule {pattern!r} gives {spec} for {name} of shape {shape}")
    fixed = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axis is not None and dim % mesh.shape[axis]:
            axis = None
        fixed.append(axis)
    return P(*fixed)


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, P]] = PARTITION_RULES):
    """A pytree of ``NamedSharding`` matching ``state`` (of arrays or abstract values)."""
    flat = nnx.to_flat_state(state)
    out = []
    for path, leaf in flat:
        value = leaf.get_value()
        out.append((path, leaf.replace(NamedSharding(mesh, partition_spec(path, value.shape,
                                                                          mesh, rules)))))
    return nnx.from_flat_state(out)


def shard_model(model: nnx.Module, mesh: Mesh,
                rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> nnx.Module:
    """Place every parameter of ``model`` on its sharding (in place) and return it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    placed = jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)
    nnx.update(model, placed)
    return model


def loader_shardings(mesh: Mesh, rules: Sequence[tuple[str, P]] = PARTITION_RULES):
    """``f(path, shape) -> NamedSharding`` for :func:`mtrl_jax.models.load_model`."""
    return lambda path, shape: NamedSharding(mesh, partition_spec(path, shape, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a ``[B, L]`` batch split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))
