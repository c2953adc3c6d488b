"""GGUF checkpoints: tiny files written by gguf's own writer (every supported tensor type, every
architecture) load to the logits of the HF folder they came from; `mtrl convert` writes a folder
that transformers and our loader read; the tokenizer built from the file's vocabulary encodes
like transformers' own GGUF tokenizer; unsupported parts fail by name."""

import json
import os
import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.models import load_model
from mtrl_jax.models.gguf import (
    GGUFCheckpoint,
    GGUFError,
    convert_gguf,
    permute_qk,
    unpermute_qk,
)
from mtrl_jax.models.tokenizer import load_tokenizer
from tests.gguf_helpers import K_QUANTS, QT, hf_to_gguf_rows, write_tiny_gguf
from tests.model_helpers import LAYOUTS

TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)
# K-quants have 256-wide blocks: a layout whose every input width is a multiple of 256
K_LAYOUT = LAYOUTS["qwen2"].replace(hidden_size=256, intermediate_size=256, num_heads=4,
                                    num_kv_heads=2, head_dim=64, num_layers=1)
TEXTS = ["Hello world 12345 and 3.14159", "I'm sure it's fine; we'll see.  Two  spaces\n\nok",
         "naïve café 日本語 🙂 — ok", "<|im_start|>user\nWhat is 17+25?<|im_end|>\n",
         "   leading and trailing   ", "x=1_000_000; y = \"\\t\"\n\tdef f(): return 42"]


def tokens_for(vocab, n=40, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (2, n)))


def logits(path, tokens):
    return np.asarray(load_model(path)(tokens))


def test_qk_permutation_is_llama_cpps_row_order_and_inverts():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    order = hf_to_gguf_rows(64, 4)
    np.testing.assert_array_equal(permute_qk(w, 4), w[order])
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w[:, 0], 4), 4), w[:, 0])  # biases


@pytest.mark.parametrize("qtype", TYPES + K_QUANTS, ids=lambda t: t.name)
def test_every_tensor_type_loads_to_the_logits_of_its_hf_folder(tmp_path, qtype):
    base = K_LAYOUT if qtype in K_QUANTS else LAYOUTS["qwen2"]
    path = str(tmp_path / "m.gguf")
    cfg = write_tiny_gguf(base, path, str(tmp_path / "hf"), qtype=qtype)
    ck = GGUFCheckpoint(path)
    kinds = set(ck.tensor_types().values())
    assert qtype.name in kinds  # the file really stores that type
    tokens = tokens_for(cfg.vocab_size)
    want = logits(tmp_path / "hf", tokens)
    got = logits(path, tokens)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_architecture_loads_and_converts_to_a_folder_transformers_reads(tmp_path, layout):
    torch = pytest.importorskip("torch")
    import transformers

    path = str(tmp_path / "m.gguf")
    cfg = write_tiny_gguf(LAYOUTS[layout], path, str(tmp_path / "hf"), qtype=QT.Q8_0,
                          quantize_embeddings=layout != "qwen3")
    ck = GGUFCheckpoint(path)
    hf_cfg = ck.hf_config()
    assert hf_cfg["model_type"] == layout
    assert hf_cfg["tie_word_embeddings"] == cfg.tie_word_embeddings
    if layout == "llama":  # llama3 RoPE scaling recovered from the rope_freqs tensor
        assert hf_cfg["rope_scaling"]["rope_type"] == "llama3"
        assert hf_cfg["rope_scaling"]["factor"] == pytest.approx(8.0)
        assert hf_cfg["rope_scaling"]["original_max_position_embeddings"] == 64
    tokens = tokens_for(cfg.vocab_size, n=96)  # past the llama3 original context
    want = logits(tmp_path / "hf", tokens)
    np.testing.assert_allclose(logits(path, tokens), want, atol=2e-5, rtol=1e-5)

    out = convert_gguf(path, tmp_path / "converted")
    np.testing.assert_allclose(logits(out, tokens), want, atol=2e-5, rtol=1e-5)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(np.asarray(tokens))).logits.numpy()
    assert np.abs(theirs - want).max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(out)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == \
            ours.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2"])
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(tmp_path, pre):
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    import transformers

    path = str(tmp_path / "m.gguf")
    write_tiny_gguf(LAYOUTS["qwen2"], path, str(tmp_path / "hf"), pre=pre)
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2
    for text in TEXTS:
        got = ours.encode(text, add_special_tokens=False)
        assert ours.decode(got) == text
        if pre == "smollm":
            # transformers' GGUF reader splits a 'smollm' file like GPT-2; SmolLM's own
            # tokenizer (and llama.cpp) split numbers into single digits first. Digit-free
            # texts must agree; numbers must come out one token per digit.
            for number in re.findall(r"\d+", text):
                assert ours.encode(number, add_special_tokens=False) == \
                    ours.convert_tokens_to_ids(list(number))
            text = re.sub(r"\d", "", text)
            got = ours.encode(text, add_special_tokens=False)
        assert got == ref.encode(text, add_special_tokens=False), text


def _write_header_only(path, arch, **tensors):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_parts_fail_by_name(tmp_path):
    path = str(tmp_path / "g.gguf")
    _write_header_only(path, "gemma2", **{"token_embd.weight": (np.zeros((4, 32), np.float32),
                                                                  None)})
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'gemma2'"):
        load_model(path)
    path = str(tmp_path / "q.gguf")
    raw = np.zeros((4, 40), np.uint8)  # Q8_1 blocks (32 values in 40 bytes)
    _write_header_only(path, "llama", **{"token_embd.weight": (raw, QT.Q8_1)})
    with pytest.raises(GGUFError, match=r"unsupported tensor type\(s\) \['Q8_1'\].*token_embd"):
        GGUFCheckpoint(path)
    path = str(tmp_path / "t.gguf")
    _write_header_only(path, "llama", **{"blk.0.ssm_conv1d.weight":
                                         (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(GGUFError, match=r"no place in the llama layout.*ssm_conv1d"):
        GGUFCheckpoint(path)
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFCheckpoint(tmp_path / "not.gguf")


def test_spm_tokenizer_is_refused_by_name(tmp_path):
    path = str(tmp_path / "m.gguf")
    write_tiny_gguf(LAYOUTS["qwen2"], path, str(tmp_path / "hf"))
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "qwen2")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "tokenizer.ggml.model":
            value = "llama"
        w.add_key_value(key, value, field.types[0],
                        sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="unsupported tokenizer model 'llama'"):
        load_tokenizer(tmp_path / "spm.gguf")
    load_model(tmp_path / "spm.gguf")  # the weights themselves still load


def test_cli_convert_and_fetch_model_errors(tmp_path, capsys):
    from mtrl_jax.cli import main

    path = str(tmp_path / "m.gguf")
    write_tiny_gguf(LAYOUTS["qwen3"], path, str(tmp_path / "src"), qtype=QT.Q4_0)
    assert main(["convert", path, str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().endswith("out")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    assert load_tokenizer(tmp_path / "out").chat_template
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 4)
    assert main(["convert", str(tmp_path / "bad.gguf"), str(tmp_path / "o2")]) == 2
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o3")]) == 2
    assert "no GGUF file" in capsys.readouterr().err
    assert main(["fetch-model", "no-such-model"]) == 2
    assert "known: smollm2-135m" in capsys.readouterr().err
