"""GGUF export round trips: read back with gguf's reader, run in llama.cpp, compare with torch."""

import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import CHATML, build_adapter, build_method_adapter, requires_smollm2

from edgetune.errors import EdgetuneError
from edgetune.export import gguf as gguf_export
from edgetune.export.gguf import write_adapter_gguf, write_gguf
from edgetune.export.gguf_vocab import pre_tokenizer
from edgetune.export.llama import gguf_logits
from edgetune.export.merge import merge
from edgetune.export.quantize import k_quant_note, quantize

IDS = list(np.random.default_rng(0).integers(3, 300, 129))
# Tensors per block beyond llama's nine (norms, q/k/v/o, gate/up/down).
EXTRA_PER_BLOCK = {"llama": 0, "mistral": 0, "qwen2": 3, "qwen3": 2, "gemma3_text": 4}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "gemma3_text": "gemma3"}


def torch_logits(model_dir, ids=IDS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].numpy()


def agreement(got, ref) -> float:
    return float((got.argmax(-1) == ref.argmax(-1)).mean())


def read_field(reader, key):
    return reader.get_field(key).contents()


def raw_field(reader, key) -> bytes:
    """A metadata entry exactly as stored: key, type, lengths and data."""
    return b"".join(part.tobytes() for part in reader.get_field(key).parts)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_f16_round_trip(arch, tiny_factory, tmp_path):
    from gguf import GGUFReader

    model_dir = tiny_factory(arch)
    path = tmp_path / "model.gguf"
    assert write_gguf(model_dir, path, "f16") == []
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * (9 + EXTRA_PER_BLOCK[arch])
    q = tensors["blk.1.attn_q.weight"]
    assert list(q.shape) == [64, 64] and q.tensor_type.name == "F16" and q.n_bytes == 64 * 64 * 2
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # 2 kv heads of 16
    assert list(tensors["token_embd.weight"].shape) == [64, 300]
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    name = reader.get_field("general.architecture").contents()
    assert name == GGUF_ARCH.get(arch, arch)
    assert (read_field(reader, f"{name}.block_count"), read_field(reader, f"{name}.attention.head_count"),
            read_field(reader, f"{name}.attention.head_count_kv")) == (2, 4, 2)
    logits, _ = gguf_logits(path, IDS)
    ref = torch_logits(model_dir)
    assert agreement(logits, ref) >= 0.99  # a near-tie may flip in f16
    assert np.abs(logits - ref).max() < 0.02


ROPE_SCALING = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    # A short original context makes Llama 3's scaling matter within the 128 test positions.
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("kind", ROPE_SCALING)
def test_rope_scaling(kind, tiny_model, tmp_path):
    """linear goes in metadata; Llama 3.1+/3.2 scaling travels as a rope_freqs tensor."""
    model_dir = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = ROPE_SCALING[kind]
    (model_dir / "config.json").write_text(json.dumps(config))
    write_gguf(model_dir, tmp_path / "model.gguf", "f16")
    logits, _ = gguf_logits(tmp_path / "model.gguf", IDS)
    ref = torch_logits(model_dir)
    assert np.abs(logits - ref).max() < 0.02
    assert np.abs(torch_logits(tiny_model) - ref).max() > 0.3  # the scaling changes the model


def test_tokenizer_metadata(tiny_model, tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "model.gguf"
    write_gguf(tiny_model, path, "f16")
    reader = GGUFReader(path)
    tokenizer = json.loads((tiny_model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert read_field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert read_field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # specials are control
    assert len(read_field(reader, "tokenizer.ggml.merges")) == len(tokenizer["model"]["merges"])
    assert read_field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert read_field(reader, "tokenizer.chat_template") == CHATML
    assert read_field(reader, "tokenizer.ggml.eos_token_id") == vocab["<|im_end|>"]
    assert read_field(reader, "tokenizer.ggml.eot_token_id") == vocab["<|im_end|>"]
    assert read_field(reader, "tokenizer.ggml.add_bos_token") is False


def test_tensors_spill_beside_the_output_not_into_tmp(tiny_model, tmp_path, monkeypatch):
    """GGUFWriter spools tensors until the header is written; past the spool size they go to disk,
    which must be the output's (its room was checked), not the system's temporary folder."""
    import tempfile

    import edgetune.export.gguf as gguf_module

    spools, spool = [], tempfile.SpooledTemporaryFile

    def recorded(*args, **kwargs):
        spools.append(kwargs.get("dir"))
        return spool(*args, **kwargs)

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", recorded)
    monkeypatch.setattr(gguf_module, "SPOOL_BYTES", 1)  # spill at the first tensor
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    (tmp_path / "out").mkdir()
    write_gguf(tiny_model, tmp_path / "out" / "model.gguf", "f16")
    assert spools == [tmp_path / "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]
    reference = tmp_path / "reference.gguf"
    monkeypatch.undo()
    write_gguf(tiny_model, reference, "f16")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == reference.read_bytes()


TEXTS = ["The capital of France is Paris.", "Convert March 15, 2024 to 2024-03-15!\n\n  ok",
         "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n"]


def llama_cpp_tokens(path, text: str) -> list[int]:
    from llama_cpp import Llama

    from edgetune.export.llama import quiet_native_logs

    with quiet_native_logs():
        llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


def test_llama_cpp_tokenizes_like_transformers(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    write_gguf(tiny_model, tmp_path / "model.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for text in TEXTS:
        assert llama_cpp_tokens(tmp_path / "model.gguf", text) == tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wrong_rotary_layout_is_caught(arch, tiny_factory, tmp_path, monkeypatch):
    """The q/k permutation is what makes llama right and would make qwen2 wrong."""
    model_dir = tiny_factory(arch)
    right = gguf_export.ARCHITECTURES[arch]
    flipped = gguf_export.Arch(right.gguf_arch, permute_qk=not right.permute_qk)
    monkeypatch.setitem(gguf_export.ARCHITECTURES, arch, flipped)
    write_gguf(model_dir, tmp_path / "model.gguf", "f16")
    logits, _ = gguf_logits(tmp_path / "model.gguf", IDS)
    assert np.abs(logits - torch_logits(model_dir)).max() > 0.1


@pytest.mark.parametrize("kind,min_agreement,max_diff", [("bf16", 0.95, 0.1), ("q8_0", 0.9, 0.2)])
def test_bf16_and_q8_0(kind, min_agreement, max_diff, tiny_model, tmp_path):
    """Random tiny models have near-tied logits, so top-1 bars here are looser than export's."""
    from gguf import GGUFReader

    path = tmp_path / "model.gguf"
    write_gguf(tiny_model, path, kind)
    q = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type.name == kind.upper()
    assert q.n_bytes == {"bf16": 64 * 64 * 2, "q8_0": 64 * 64 // 32 * 34}[kind]
    logits, _ = gguf_logits(path, IDS)
    ref = torch_logits(tiny_model)
    assert agreement(logits, ref) >= min_agreement
    assert np.abs(logits - ref).max() < max_diff


def test_llama_cpp_quantize(tiny_model, tmp_path):
    from gguf import GGUFReader

    write_gguf(tiny_model, tmp_path / "f16.gguf", "f16")
    assert quantize(tmp_path / "f16.gguf", tmp_path / "q4_0.gguf", "q4_0") == []
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "q4_0.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    used = Counter({"Q5_0": 166, "Q4_K": 16})
    assert k_quant_note("q4_k_m", [576, 1536], used) == (
        "row length 576 is not a multiple of 256: llama.cpp fell back from q4_k_m for those tensors "
        "(matrices written as: 166 q5_0, 16 q4_k)")
    assert k_quant_note("q4_k_m", [512, 1024], used) == "" and k_quant_note("q4_0", [576], used) == ""


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_over_base_equals_merged(rslora, tiny_model, tmp_path):
    from gguf import GGUFReader

    run = build_adapter(tiny_model, tmp_path / "run", rank=4, alpha=8.0, rslora=rslora)
    write_gguf(tiny_model, tmp_path / "base.gguf", "f16")
    alpha = write_adapter_gguf(tiny_model, run, tmp_path / "adapter.gguf")
    assert alpha == (8.0 * math.sqrt(4) if rslora else 8.0)  # llama.cpp divides by rank
    reader = GGUFReader(tmp_path / "adapter.gguf")
    assert read_field(reader, "general.type") == "adapter"
    assert read_field(reader, "adapter.type") == "lora"
    assert read_field(reader, "adapter.lora.alpha") == alpha
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert len(shapes) == 2 * 7 * 2
    assert shapes["blk.0.attn_k.weight.lora_a"] == [64, 4]  # numpy [r, in]
    assert shapes["blk.0.attn_k.weight.lora_b"] == [4, 32]  # numpy [out, r]
    ref = torch_logits(merge(tiny_model, run, tmp_path / "merged"))
    logits, _ = gguf_logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "adapter.gguf")
    assert agreement(logits, ref) >= 0.99  # a near-tie may flip in f16
    assert np.abs(logits - ref).max() < 0.02
    assert np.abs(torch_logits(tiny_model) - ref).max() > 0.1  # the adapter does change the output


def test_pruned_adalora_adapter_over_base_equals_merged(tiny_model, tmp_path):
    """AdaLoRA as a LoRA adapter with per-module ranks: A carries the singular values, B the ratio of
    each module's rank to the initial one; modules pruned to rank 0 are left out."""
    from gguf import GGUFReader

    run = build_method_adapter(tiny_model, tmp_path / "run", "adalora")
    write_gguf(tiny_model, tmp_path / "base.gguf", "f16")
    alpha = write_adapter_gguf(tiny_model, run, tmp_path / "adapter.gguf")
    assert alpha == 32.0  # as given: the scale is alpha / initial rank, folded per module into B
    shapes = {t.name: list(t.shape) for t in GGUFReader(tmp_path / "adapter.gguf").tensors}
    assert len(shapes) == 2 * 6 * 2 and "blk.0.attn_q.weight.lora_a" not in shapes
    assert shapes["blk.0.attn_k.weight.lora_a"] == [64, 2]  # 2 of 4 ranks kept
    ref = torch_logits(merge(tiny_model, run, tmp_path / "merged"))
    logits, _ = gguf_logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "adapter.gguf")
    assert agreement(logits, ref) >= 0.99
    assert np.abs(logits - ref).max() < 0.02
    assert np.abs(torch_logits(tiny_model) - ref).max() > 0.1


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_full_rank_updates_are_not_gguf_adapters(method, tiny_model, tmp_path):
    run = build_method_adapter(tiny_model, tmp_path / "run", method)
    with pytest.raises(EdgetuneError, match="not a pair of low-rank matrices"):
        write_adapter_gguf(tiny_model, run, tmp_path / "adapter.gguf")


def test_adapter_for_another_base_is_refused_at_load(tiny_model, tiny_factory, tmp_path):
    """llama-cpp-python 0.3 would silently run without an adapter llama.cpp refused."""
    from edgetune.export.llama import load_llama

    qwen2 = tiny_factory("qwen2")
    write_adapter_gguf(qwen2, build_adapter(qwen2, tmp_path / "run"), tmp_path / "adapter.gguf")
    write_gguf(tiny_model, tmp_path / "base.gguf", "f16")
    with pytest.raises(EdgetuneError, match="adapter.gguf is a qwen2 adapter; base.gguf is llama"):
        load_llama(tmp_path / "base.gguf", 64, lora=tmp_path / "adapter.gguf")


def test_unsupported_architecture_lists_supported(tiny_model, tmp_path):
    model_dir = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"model_type": "gpt_neox"}))
    with pytest.raises(EdgetuneError, match="'gpt_neox'.*supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        write_gguf(model_dir, tmp_path / "x.gguf", "f16")
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgetuneError, match="rope type 'yarn'.*supported: default, linear, llama3"):
        write_gguf(model_dir, tmp_path / "x.gguf", "f16")


def test_pre_tokenizer_families(tiny_model, tmp_path):
    model_dir = shutil.copytree(tiny_model, tmp_path / "model")
    assert pre_tokenizer(model_dir) == "gpt-2"
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert pre_tokenizer(model_dir) == "smollm"
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(EdgetuneError, match="unknown pre-tokenizer.*supported families: gpt-2"):
        pre_tokenizer(model_dir)
    (model_dir / "edgetune_source.json").write_text(json.dumps({"tokenizer.ggml.pre": "qwen2"}))
    assert pre_tokenizer(model_dir) == "qwen2"  # the GGUF it came from knows best


@requires_smollm2
def test_smollm2_matches_shipped_gguf(smollm2_export):
    """Our tokens, merges and pre-tokenizer equal those of the GGUF llama.cpp's converter made."""
    from gguf import GGUFReader

    from edgetune import models

    ours = GGUFReader(smollm2_export / "model-f16.gguf")
    shipped = GGUFReader(models.builtin_gguf("smollm2-135m"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base",
                "llama.context_length", "llama.attention.head_count_kv"):
        assert raw_field(ours, key) == raw_field(shipped, key), key  # byte for byte
    assert {t.name for t in ours.tensors} == {t.name for t in shipped.tensors}  # 272, tied output
    for text in TEXTS:
        assert (llama_cpp_tokens(smollm2_export / "model-f16.gguf", text)
                == llama_cpp_tokens(models.builtin_gguf("smollm2-135m"), text)), text


@requires_smollm2
def test_smollm2_verification_figures(smollm2_export):
    """The real model clears export's thresholds over 256 held-out positions."""
    rows = {r["format"]: r for r in json.loads((smollm2_export / "report.json").read_text())}
    assert rows["gguf f16"]["positions"] == 256
    assert rows["gguf f16"]["passed"] and rows["gguf f16"]["relative_kld"] < 1e-5
    assert rows["gguf q8_0"]["passed"] and rows["gguf q8_0"]["relative_kld"] < 1e-3
    assert rows["gguf q8_0"]["clear_top1"] == 1.0 and rows["gguf q8_0"]["clear_positions"] > 100
    assert 0.97 < rows["gguf f16"]["perplexity_ratio"] < 1.03
