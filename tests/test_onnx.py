"""ONNX export round trips: build from a tiny model, load back in onnxruntime(-genai), compare with torch."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, requires_smollm2

from edgetune.errors import EdgetuneError
from edgetune.export import onnx_generic
from edgetune.export.onnx import export_onnx, read_config, verify
from edgetune.export.onnx_runtime import onnx_logits, session, step_feed

TEXT = " ".join(CORPUS[:8])


def held_out(model_dir: Path, n: int = 256) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT * 8)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_genai_fp32_round_trip(tiny_factory, tmp_path, arch):
    model = tiny_factory(arch)
    ids = held_out(model)
    row = export_onnx(model, tmp_path / "onnx", "fp32", False, ids)
    out = tmp_path / "onnx"
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert row.passed, row
    assert row.file == "onnx/model.onnx" and row.format == "onnx fp32"
    assert row.positions == len(ids) - 1 and row.top1_agreement == 1.0
    assert row.max_logit_diff < 1e-3
    assert row.perplexity_ratio == pytest.approx(1.0, abs=1e-4)
    assert row.size_bytes > 4 * 100_000  # fp32 weights of a ~130k-parameter model
    assert row.decode_tokens_per_s and row.decode_tokens_per_s > 0
    assert "matches torch for 32/32 tokens" in row.note


@pytest.mark.parametrize("tie", [False, True])
def test_genai_int8_runs(tiny_factory, tmp_path, tie):
    import onnx

    model = tiny_factory("llama", tie=tie)
    ids = held_out(model)
    row = export_onnx(model, tmp_path / "onnx", "int8", False, ids)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = {n.name for n in graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) >= 2 * 4  # qkv, o, gate/up and down of both layers (the builder fuses some)
    # Tied: the output projection stays fp32 and shares the embedding (see onnx_genai._options).
    assert any("lm_head" in name for name in nbits) is not tie
    assert row.format == "onnx int8"
    assert row.top1_agreement >= 0.9 and 0 < row.max_logit_diff < 1  # quantized, yet close
    assert row.perplexity_ratio == pytest.approx(1.0, abs=0.05)


def test_genai_int4_keeps_sensitive_matrices_at_8_bits(tiny_factory, tmp_path):
    import onnx

    model = tiny_factory("llama", tie=True)
    row = export_onnx(model, tmp_path / "onnx", "int4", False, held_out(model))
    assert row.format == "onnx int4" and row.passed  # reported, not gated
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert {b for name, b in bits.items() if "lm_head" in name} == {8}
    # llama.cpp's mix: layer 0 of 2 is in the first eighth, so its qkv and down go to 8 bits.
    assert {b for name, b in bits.items() if "layers.0/mlp/down_proj" in name} == {8}
    assert {b for name, b in bits.items() if "layers.1/" in name} == {4}
    assert 0 < row.relative_kld < 0.5 and row.clear_positions > 0


def test_generation_through_onnxruntime_genai(tiny_model, tmp_path):
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "onnx"
    export_onnx(tiny_model, out, "fp32", False, held_out(tiny_model), max_length=200)
    genai_config = json.loads((out / "genai_config.json").read_text())
    assert genai_config["search"]["max_length"] == 200 and genai_config["model"]["context_length"] == 256
    model = og.Model(str(out))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt)["input_ids"]
    assert list(og.Tokenizer(model).encode(prompt)) == ids  # the folder's tokenizer is the same
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, min_length=len(ids) + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(t) for t in generator.get_sequence(0)[len(ids):]]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                      do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert generated == expected


@pytest.fixture(scope="module")
def generic_fp32(tiny_model, tmp_path_factory):
    """One generic (torch.onnx dynamo) export shared by the generic tests: it takes ~20 s."""
    out = tmp_path_factory.mktemp("generic") / "onnx-generic"
    row = export_onnx(tiny_model, out, "fp32", True, held_out(tiny_model))
    return out, row


def test_generic_fp32_round_trip(generic_fp32):
    out, row = generic_fp32
    assert row.passed, row
    assert row.format == "onnx generic fp32"
    assert row.top1_agreement == 1.0 and row.max_logit_diff < 1e-3
    assert "matches torch for 32/32 tokens" in row.note
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("model.fp32*"))


def test_generic_kv_cache_step_matches_torch(generic_fp32, tiny_model):
    out, _ = generic_fp32
    config = read_config(tiny_model)
    ids = held_out(tiny_model, 40)
    sess = session(out / "model.onnx")
    names = [o.name for o in sess.get_outputs()]
    prefill = dict(zip(names, sess.run(None, step_feed(sess, config, ids[:30], 0, None))))
    assert prefill["present.0.key"].shape == (1, 2, 30, 16)
    # Ten more tokens in two steps through the cache: a 1-token step, then a 9-token chunk.
    step = dict(zip(names, sess.run(None, step_feed(sess, config, ids[30:31], 30, prefill))))
    chunk = dict(zip(names, sess.run(None, step_feed(sess, config, ids[31:], 31, step))))
    reference = torch_logits(tiny_model, ids)
    np.testing.assert_allclose(step["logits"][0], reference[30:31], atol=1e-4)
    np.testing.assert_allclose(chunk["logits"][0], reference[31:], atol=1e-4)
    assert chunk["present.1.value"].shape == (1, 2, 40, 16)


def test_generic_int8_matmulnbits(generic_fp32, tiny_model, tmp_path):
    import onnx

    src, _ = generic_fp32
    out = tmp_path / "onnx-generic-int8"
    out.mkdir()
    onnx_generic._quantize(src / "model.onnx", out / "model.onnx", 8)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops  # weight-only blocks, not quantize_dynamic's QLinear/DynamicQuantize ops
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger"}
    data = out / "model.onnx.data"
    assert data.stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777
    row = verify(tiny_model, out, "int8", True, held_out(tiny_model), read_config(tiny_model))
    assert row.top1_agreement >= 0.9 and row.perplexity_ratio == pytest.approx(1.0, abs=0.05)
    assert row.decode_tokens_per_s > 0


def test_unsupported_architecture_lists_supported(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgetuneError, match="GPT2LMHeadModel.*llama, mistral, qwen2, qwen3"):
        export_onnx(folder, tmp_path / "out", "fp32", False, list(range(300)))
    assert not (tmp_path / "out").exists()


def test_unknown_precision_is_an_error(tiny_model, tmp_path):
    with pytest.raises(EdgetuneError, match="fp16.*fp32, int8, int4"):
        export_onnx(tiny_model, tmp_path / "out", "fp16", False, list(range(300)))


def test_onnx_logits_with_empty_cache_match_torch(tiny_factory, tmp_path):
    # qwen3 adds q/k norms: the builder handles it, and the verifier feeds it an empty cache.
    model = tiny_factory("qwen3")
    out = tmp_path / "onnx"
    from edgetune.export.onnx_genai import build

    build(model, out, "fp32")
    ids = held_out(model, 64)
    np.testing.assert_allclose(onnx_logits(out / "model.onnx", ids, read_config(model)),
                               torch_logits(model, ids), atol=1e-4)


@requires_smollm2
def test_smollm2_int8_is_near_lossless(tmp_path):
    from transformers import AutoTokenizer

    from edgetune.models import resolve

    model = resolve("smollm2-135m")
    text = Path(__file__).with_name("conftest.py").read_text()  # English and code, not in the data
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"][:384]
    row = export_onnx(model, tmp_path / "onnx", "int8", False, ids)
    assert row.passed and row.perplexity_ratio <= 1.01 and row.relative_kld < 0.002, row
    assert row.size_bytes < 300 * 2**20
