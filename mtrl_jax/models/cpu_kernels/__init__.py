"""Hand-written XLA:CPU kernels (XLA FFI custom calls), compiled on first use.

The only kernel so far is a decode step's cache write and attention (``decode_attention.cc``),
used by the feature-major decode steps of :meth:`~mtrl_jax.models.transformer.CausalLM.
decode_logits`. XLA:CPU runs that step's attention as one loop fusion on a single thread over
the whole attention window, after a scatter into the cache; the kernel writes the new key and
value in place, spreads the (row, kv head) pairs over XLA's intra-op thread pool and reads only
each row's valid slots (``experiments/scripts/decode_kernel_ab.py``; experiments/LOG.md).

The source is compiled with the system C++ compiler (``$CXX``, else ``g++`` or ``c++``) against
the XLA FFI headers that jaxlib ships, into ``$MTRL_JAX_KERNEL_CACHE`` (default
``~/.cache/mtrl_jax/kernels``), once per source, jaxlib version, compiler and CPU. Without a
compiler, or with ``MTRL_JAX_CPU_KERNELS=0``, :func:`decode_attention_available` is ``False``
(with one warning saying why) and callers keep the XLA formulation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_attention.cc")
_TARGET = "mtrl_decode_attention"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_library(cache_dir: Path | None = None) -> Path:
    """Compile ``decode_attention.cc`` (or reuse an earlier build) and return the library path.

    Raises ``RuntimeError`` naming the compiler's error output when it fails."""
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([
        _SOURCE.read_text(), " ".join(_FLAGS), jax.__version__, include, version,
        _cpu_signature()]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or os.environ.get("MTRL_JAX_KERNEL_CACHE")
                     or Path.home() / ".cache" / "mtrl_jax" / "kernels")
    lib = cache_dir / f"decode_attention-{key}.so"
    if lib.exists():
        return lib
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(f"{cache_dir} is not writable")
    except OSError as e:  # a read-only home: build under the temporary directory instead
        fallback = Path(tempfile.gettempdir()) / "mtrl_jax_kernels"
        if cache_dir == fallback:
            raise RuntimeError(f"no writable folder for the kernel: {e}") from e
        log.warning("kernel cache %s unusable (%s); building under %s", cache_dir, e, fallback)
        return build_library(fallback)
    # compile to a temporary name, then rename: concurrent builders (the trainer and a rollout
    # worker) never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    log.info("compiling %s with %s into %s", _SOURCE.name, cxx, lib)
    try:
        proc = subprocess.run([cxx, *_FLAGS, "-I", include, str(_SOURCE), "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {_SOURCE.name}:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def decode_attention_available() -> bool:
    """Whether :func:`decode_attention` can run here: on CPU, unless ``MTRL_JAX_CPU_KERNELS=0``,
    once the kernel is built and registered (the first call builds it: ~3 s)."""
    if os.environ.get("MTRL_JAX_CPU_KERNELS", "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build_library()))
                jax.ffi.register_ffi_target(
                    _TARGET, jax.ffi.pycapsule(lib.MtrlDecodeAttention), platform="cpu")
                _state.update(ok=True, lib=lib)
            except Exception as e:  # no compiler, a failed build, a failed load
                log.warning("CPU decode-attention kernel unavailable, decode steps use the "
                            "XLA formulation (slower on CPU): %s", e)
                _state.update(ok=False, error=str(e))
        return bool(_state["ok"])


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, write_pos: jax.Array,
                     n_valid: jax.Array, k_cache: jax.Array, v_cache: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's cache write and attention, feature-major (CPU, f32; see
    decode_attention.cc).

    ``q [H, D, B]``, this step's ``k_new, v_new [KV, D, B]``, written at slot ``write_pos [B]``
    of each row (``S`` or more: not written); row ``b`` then attends over its slots ``0 ..
    n_valid[b] - 1`` (clipped to ``[1, S]``) of ``k_cache [B, KV, D, S]``, ``v_cache [B, KV, S,
    D]``. Returns the attention output ``[H, D, B]`` f32 and the updated caches (the cache
    buffers are donated to the call: updated in place). Call
    :func:`decode_attention_available` first."""
    h, d, b = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[3]
    if (k_cache.shape != (b, kv, d, s) or v_cache.shape != (b, kv, s, d)
            or k_new.shape != (kv, d, b) or v_new.shape != (kv, d, b) or h % kv):
        raise ValueError(f"decode_attention: q {q.shape}, k_new {k_new.shape}, v_new "
                         f"{v_new.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape} do "
                         "not fit q [H, D, B], k_new/v_new [KV, D, B], k_cache [B, KV, D, S], "
                         "v_cache [B, KV, S, D]")
    f32 = jnp.float32
    call = jax.ffi.ffi_call(
        _TARGET, (jax.ShapeDtypeStruct((h, d, b), f32), jax.ShapeDtypeStruct(k_cache.shape, f32),
                  jax.ShapeDtypeStruct(v_cache.shape, f32)),
        input_output_aliases={5: 1, 6: 2})
    return call(q.astype(f32), k_new.astype(f32), v_new.astype(f32),
                write_pos.astype(jnp.int32), n_valid.astype(jnp.int32), k_cache.astype(f32),
                v_cache.astype(f32))
