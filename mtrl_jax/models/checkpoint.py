"""Hugging Face checkpoint I/O without torch: ``config.json`` + ``*.safetensors`` (+ index).

- :func:`load_model` reads a local HF directory (or a ``.gguf`` file) into a :class:`CausalLM`
  (optionally with fresh LoRA adapters, optionally placing each weight on a sharding as it is
  read).
- :func:`save_model` writes the base weights back in the same format (sharded above
  ``max_shard_bytes``), loadable by transformers and vLLM.
- :func:`export_peft_adapter` writes the LoRA weights as a PEFT adapter
  (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names);
  :func:`merge_lora` folds them into the base weights.

HF stores projections as ``weight [out, in]``; we hold ``kernel [in, out]`` and transpose here.
Name or shape mismatches fail with the tensor's name, the file and both shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mtrl_jax.models.config import ModelConfig
from mtrl_jax.models.gguf import GGUFCheckpoint, is_gguf
from mtrl_jax.models.lora import LoRAConfig
from mtrl_jax.models.transformer import CausalLM, fold_lora

# HF keeps these non-parameter buffers in some checkpoints; they carry no weights we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Path = tuple[Any, ...]


def hf_name(path: Path) -> tuple[str, bool]:
    """Our state path -> (HF tensor name, whether to transpose)."""
    keys = [str(p) for p in path]
    if keys == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if keys == ["lm_head"]:
        return "lm_head.weight", True
    if keys[-1] == "kernel":
        return "model." + ".".join(keys[:-1]) + ".weight", True
    return "model." + ".".join(keys), False


def _base_paths(state: nnx.State) -> Iterator[tuple[Path, Any]]:
    for path, leaf in nnx.to_flat_state(state):
        yield tuple(path), leaf


# ------------------------------------------------------------------------------- reading


class SafetensorsDir:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(self.path, fn) for name, fn in weight_map.items()}
        else:
            files = sorted(fn for fn in os.listdir(self.path) if fn.endswith(".safetensors")
                           and not fn.startswith("adapter_"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
            self.files = {}
            for fn in files:
                with safe_open(os.path.join(self.path, fn), framework="numpy") as f:
                    for name in f.keys():
                        self.files[name] = os.path.join(self.path, fn)

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        with safe_open(self.files[name], framework="numpy") as f:
            return f.get_tensor(name)


def load_model(
    path: str | os.PathLike,
    *,
    lora: LoRAConfig | None = None,
    seed: int = 0,
    shardings: Callable[[Path, tuple[int, ...]], jax.sharding.Sharding] | None = None,
    **config_overrides,
) -> CausalLM:
    """Load a local HF checkpoint directory.

    Args:
      path: directory with ``config.json`` and ``*.safetensors``, or a ``.gguf`` file
        (dequantized to the config's dtype; see :mod:`mtrl_jax.models.gguf`).
      lora: adapters to add (fresh: ``B = 0``, so the model's outputs are unchanged).
      seed: seed of the LoRA ``A`` initialisation.
      shardings: optional ``f(state_path, shape) -> Sharding``; each weight is placed on it as
        it is read (no full replica on one device).
      config_overrides: :class:`ModelConfig` fields, e.g. ``dtype="bfloat16"``.
    """
    path = os.fspath(path)
    if is_gguf(path):
        tensors = GGUFCheckpoint(path)
        cfg = ModelConfig.from_hf(tensors.hf_config(), **config_overrides)
    else:
        cfg = ModelConfig.from_hf(path, **config_overrides)
        tensors = SafetensorsDir(path)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, lora, rngs=nnx.Rngs(seed)))
    graphdef, lora_abs, base_abs = nnx.split(abstract, nnx.LoRAParam, ...)

    expected = {}
    for p, leaf in _base_paths(base_abs):
        name, transpose = hf_name(p)
        expected[name] = (p, transpose, leaf.shape, leaf.dtype)
    available = tensors.names()
    missing = sorted(set(expected) - available)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor(s) the {cfg.model_type} layout needs: "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(n for n in available - set(expected)
                        if not n.endswith(_IGNORED_SUFFIXES)
                        and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
    if unexpected:
        raise ValueError(f"{path}: tensor(s) that do not fit the {cfg.model_type} layout: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    flat = []
    for name, (p, transpose, shape, dtype) in expected.items():
        hf_shape = tensors.shape(name)
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if hf_shape != want:
            raise ValueError(f"{path}: tensor {name!r} has shape {hf_shape}, the config "
                             f"implies {want}")
        arr = tensors.get(name)
        if transpose:
            arr = arr.T
        arr = np.asarray(arr).astype(dtype)
        value = (jax.device_put(arr, shardings(p, arr.shape)) if shardings
                 else jnp.asarray(arr))
        flat.append((p, value))
    base_state = _state_from_flat(base_abs, dict(flat))
    lora_state = init_lora_state(lora_abs, seed, shardings)
    return nnx.merge(graphdef, lora_state, base_state)


def _state_from_flat(abstract: nnx.State, values: dict[Path, jax.Array]) -> nnx.State:
    flat = nnx.to_flat_state(abstract)
    new = []
    for path, leaf in flat:
        new.append((path, leaf.replace(values[tuple(path)])))
    return nnx.from_flat_state(new)


def init_lora_state(abstract: nnx.State, seed: int = 0, shardings=None) -> nnx.State:
    """Fresh LoRA values for an abstract LoRA state: ``A ~ U(+-1/sqrt(in))``, ``B = 0``."""
    flat = list(nnx.to_flat_state(abstract))
    key = jax.random.key(seed)
    new = []
    for i, (path, leaf) in enumerate(flat):
        shape, dtype = leaf.shape, leaf.dtype
        if str(path[-1]) == "lora_a":
            bound = 1.0 / (shape[0] ** 0.5)
            val = jax.random.uniform(jax.random.fold_in(key, i), shape, dtype, -bound, bound)
        else:
            val = jnp.zeros(shape, dtype)
        if shardings is not None:
            val = jax.device_put(val, shardings(tuple(path), shape))
        new.append((path, leaf.replace(val)))
    return nnx.from_flat_state(new)


# ------------------------------------------------------------------------------- writing


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def model_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """The base weights under their HF names (HF layout, contiguous numpy arrays)."""
    _, _, base = nnx.split(model, nnx.LoRAParam, ...)
    out = {}
    for p, leaf in _base_paths(base):
        name, transpose = hf_name(p)
        arr = _np(leaf.get_value())
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def save_model(model: CausalLM, out_dir: str | os.PathLike, *,
               max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``config.json`` and the base weights (``model.safetensors`` or shards + index).

    LoRA adapters are not included: :func:`merge_lora` first to save a merged model, or
    :func:`export_peft_adapter` to save them apart.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.cfg.to_hf_dict(), f, indent=2)
    tensors = model_tensors(model)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fn), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fn))
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ------------------------------------------------------------------------------- LoRA export

_PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def lora_pairs(model: CausalLM) -> Iterator[tuple[Path, Any]]:
    """``(path of the Linear, Linear)`` for every adapted projection."""
    for path, node in nnx.iter_graph(model):
        if getattr(node, "lora_a", None) is not None and hasattr(node, "kernel"):
            yield tuple(path), node


def export_peft_adapter(model: CausalLM, out_dir: str | os.PathLike, *,
                        base_model_name_or_path: str | None = None) -> None:
    """Write the adapters as a PEFT LoRA adapter that PEFT and vLLM load.

    Keys are ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]`` and
    ``... .lora_B.weight [out, r]``.
    """
    lora = model.lora_config
    if lora.rank == 0:
        raise ValueError("the model has no LoRA adapters (lora rank 0)")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for path, lin in lora_pairs(model):
        prefix = "base_model.model.model." + ".".join(str(p) for p in path)
        tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(_np(lin.lora_a[...]).T)
        tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(_np(lin.lora_b[...]).T)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(_PEFT_MODULES[t] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def merge_lora(model: CausalLM) -> CausalLM:
    """A copy of ``model`` with ``W + (alpha/r) A B`` folded into each kernel and LoRA removed."""
    folded = nnx.clone(model)
    fold_lora(folded)
    _, _, base = nnx.split(folded, nnx.LoRAParam, ...)
    plain = nnx.eval_shape(lambda: CausalLM(model.cfg, None, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(plain)
    values = {tuple(p): leaf.get_value() for p, leaf in nnx.to_flat_state(base)}
    return nnx.merge(graphdef, _state_from_flat(abstract, values))


def _peft_values(model: CausalLM, adapter_dir: str) -> Iterator[tuple[Path, str, Any,
                                                                    np.ndarray]]:
    """``(Linear path, "lora_a" | "lora_b", the model's param, the adapter's value)`` for every
    adapted projection, checked against the model (rank, alpha, targets, shapes, no extras)."""
    from safetensors.numpy import load_file

    want = peft_lora_config(adapter_dir)
    have = model.lora_config
    if (have.rank, float(have.alpha), tuple(sorted(have.targets))) != \
            (want.rank, float(want.alpha), tuple(sorted(want.targets))):
        raise ValueError(f"{adapter_dir}: adapter r={want.rank} alpha={want.alpha} targets="
                         f"{sorted(want.targets)} does not fit the model's LoRA r={have.rank} "
                         f"alpha={have.alpha} targets={sorted(have.targets)}")
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    used = set()
    for path, lin in lora_pairs(model):
        prefix = "base_model.model.model." + ".".join(str(p) for p in path)
        for which, attr in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
            key = f"{prefix}.{which}.weight"
            if key not in tensors:
                raise ValueError(f"{adapter_dir}: adapter lacks {key!r}")
            param = getattr(lin, attr)
            value = np.asarray(tensors[key]).T
            if value.shape != tuple(param[...].shape):
                raise ValueError(f"{adapter_dir}: {key} has shape {value.T.shape}, the model "
                                 f"expects {tuple(reversed(param[...].shape))}")
            used.add(key)
            yield path, attr, param, value
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{adapter_dir}: tensors the model has no place for: {extra[:4]}")


def load_peft_adapter(model: CausalLM, adapter_dir: str | os.PathLike) -> CausalLM:
    """Load a PEFT LoRA adapter (as :func:`export_peft_adapter` writes it) into ``model``'s
    adapters, in place; returns ``model``. The model's LoRA rank, alpha and targets must match
    the adapter's ``adapter_config.json`` (see :func:`peft_lora_config`); every adapted
    projection must be in the file."""
    values = list(_peft_values(model, os.fspath(adapter_dir)))  # all checked before any write
    for _, _, param, value in values:
        param[...] = jnp.asarray(value, dtype=param[...].dtype)
    return model


def read_peft_adapter(model: CausalLM, adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """A PEFT LoRA adapter as a pure dict of ``model``'s LoRA state (what
    ``nnx.replace_by_pure_dict`` takes), checked as :func:`load_peft_adapter` checks it;
    ``model`` is not changed."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    for path, attr, param, value in _peft_values(model, os.fspath(adapter_dir)):
        node = pure
        for p in path:
            node = node[p]
        node[attr] = jnp.asarray(value, dtype=param[...].dtype)
    return pure


def peft_lora_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT adapter folder."""
    with open(os.path.join(os.fspath(adapter_dir), "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: not a LoRA adapter (peft_type "
                         f"{cfg.get('peft_type')!r})")
    short = {v: k for k, v in _PEFT_MODULES.items()}
    mods = cfg["target_modules"]
    unknown = [m for m in mods if m not in short]
    if unknown:
        raise ValueError(f"{adapter_dir}: target modules {unknown} are not supported")
    return LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                      targets=tuple(short[m] for m in mods))
