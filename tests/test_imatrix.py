"""Importance matrices: llama.cpp's definition computed in torch, its GGUF format, and llama.cpp
quantizing with it."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import CORPUS, build_adapter, write_jsonl

from edgetune import cli
from edgetune.errors import EdgetuneError
from edgetune.export import imatrix
from edgetune.export.gguf import write_gguf
from edgetune.export.quantize import quantize

# 2 layers x (q, k, v, o, gate, up, down); like llama-imatrix, neither the output nor the embedding.
NAMES = sorted(f"blk.{i}.{t}.weight" for i in range(2) for t in
               ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))


@pytest.fixture(scope="module")
def chunks(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return imatrix.calibration_chunks([tokenizer(t)["input_ids"] for t in CORPUS[:24]] * 4)


@pytest.fixture(scope="module")
def computed(tiny_model, chunks):
    return imatrix.compute(tiny_model, chunks, ["calib.jsonl"])


def test_calibration_chunks():
    assert imatrix.calibration_chunks([[1, 2], [3]] * 400, max_tokens=1000) == (
        [[1, 2, 3] * 170 + [1, 2]] + [[3, 1, 2] * 162 + [3, 1]])
    assert sum(map(len, imatrix.calibration_chunks([list(range(70000))]))) == imatrix.MAX_TOKENS


def test_sums_are_x_squared_at_each_linear_input(tiny_model, chunks, computed):
    from transformers import AutoModelForCausalLM

    assert sorted(computed.sums) == NAMES
    tokens = sum(map(len, chunks))
    assert all(int(c[0]) == tokens for c in computed.counts.values()) and computed.tokens == tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    layer = model.model.layers[0]
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(model.model.embed_tokens(torch.tensor([c])))[0]
                       for c in chunks]).double()
    expected = (x * x).sum(0).numpy()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):  # one input
        assert np.allclose(computed.sums[name][0], expected, rtol=1e-5), name
    assert computed.sums["blk.1.ffn_down.weight"].shape == (1, 128)
    assert np.allclose(computed.means()["blk.0.attn_q.weight"], expected / tokens, rtol=1e-5)


def test_gguf_file_in_llama_cpp_format(computed, tmp_path):
    from gguf import GGUFReader

    imatrix.write(computed, tmp_path / "imatrix.gguf")
    reader = GGUFReader(tmp_path / "imatrix.gguf")
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("general.architecture") is None  # llama-imatrix writes none
    assert reader.get_field("imatrix.datasets").contents() == ["calib.jsonl"]
    assert reader.get_field("imatrix.chunk_count").contents() == computed.chunks
    assert reader.get_field("imatrix.chunk_size").contents() == 512
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(f"{n}.{part}" for n in NAMES for part in ("counts", "in_sum2"))
    sums, counts = tensors["blk.0.ffn_down.weight.in_sum2"], tensors["blk.0.ffn_down.weight.counts"]
    assert list(sums.shape) == [128, 1] and list(counts.shape) == [1, 1]  # ne0 first, as ggml has it
    assert sums.tensor_type.name == counts.tensor_type.name == "F32"
    back = imatrix.read(tmp_path / "imatrix.gguf")
    assert (back.datasets, back.chunks, back.tokens) == (["calib.jsonl"], computed.chunks, computed.tokens)
    for name in NAMES:
        assert np.allclose(back.means()[name], computed.means()[name], rtol=1e-6)


def _dequantized(path, name):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    return dequantize(tensor.data, tensor.tensor_type).reshape(tensor.shape[::-1].tolist())


def test_llama_cpp_weighs_rounding_by_the_imatrix(tiny_model, tmp_path):
    """One channel marked 10^4 times as important keeps its weights closer after 4-bit rounding."""
    write_gguf(tiny_model, tmp_path / "f16.gguf", "f16")
    quantize(tmp_path / "f16.gguf", tmp_path / "plain.gguf", "q4_0")
    means = {name: np.ones(128 if "ffn_down" in name else 64, np.float32) for name in NAMES}
    means["blk.0.attn_q.weight"][5] = 1e4
    quantize(tmp_path / "f16.gguf", tmp_path / "weighted.gguf", "q4_0", imatrix=means)
    exact = _dequantized(tmp_path / "f16.gguf", "blk.0.attn_q.weight")
    plain = np.abs(_dequantized(tmp_path / "plain.gguf", "blk.0.attn_q.weight") - exact)
    weighted = np.abs(_dequantized(tmp_path / "weighted.gguf", "blk.0.attn_q.weight") - exact)
    assert weighted[:, 5].mean() < 0.5 * plain[:, 5].mean()
    assert weighted.mean() > plain.mean()  # paid for by the other channels
    other = "blk.1.attn_q.weight"  # uniform importance: llama.cpp's weighted search, not plain rounding
    assert not np.array_equal(_dequantized(tmp_path / "plain.gguf", other),
                              _dequantized(tmp_path / "weighted.gguf", other))


def test_types_that_need_an_imatrix(tiny_model, computed, tmp_path):
    from gguf import GGUFReader

    write_gguf(tiny_model, tmp_path / "f16.gguf", "f16")
    with pytest.raises(EdgetuneError, match="llama.cpp makes iq3_xxs only with an importance matrix"):
        quantize(tmp_path / "f16.gguf", tmp_path / "iq3.gguf", "iq3_xxs")
    notes = quantize(tmp_path / "f16.gguf", tmp_path / "iq3.gguf", "iq3_xxs", imatrix=computed.means())
    assert "fell back from iq3_xxs" in notes[0]  # widths 64 and 128: 32-value blocks only
    kinds = {t.tensor_type.name for t in GGUFReader(tmp_path / "iq3.gguf").tensors if len(t.shape) > 1}
    assert kinds == {"IQ4_NL", "Q8_0"}  # llama.cpp's fallback, and its output type


def test_imatrix_for_another_model_is_refused(tiny_model, computed, tmp_path):
    write_gguf(tiny_model, tmp_path / "f16.gguf", "f16")
    imatrix.check(computed, tmp_path / "f16.gguf", "ours.gguf")
    deeper = imatrix.Imatrix({**computed.sums, "blk.7.attn_q.weight": computed.sums[NAMES[0]]},
                             computed.counts, [], 1, 512)
    with pytest.raises(EdgetuneError, match="--imatrix x.gguf was made for another model: it has "
                                            "blk.7.attn_q.weight, which this model does not"):
        imatrix.check(deeper, tmp_path / "f16.gguf", "x.gguf")
    wider = imatrix.Imatrix({n: np.ones((1, 96)) for n in computed.sums}, computed.counts, [], 1, 512)
    with pytest.raises(EdgetuneError, match=r"its blk\.0\.attn_k\.weight has 96 values per row, this "
                                            r"model's has 64"):
        imatrix.check(wider, tmp_path / "f16.gguf", "x.gguf")
    (tmp_path / "legacy.dat").write_bytes(b"\x02\x00\x00\x00junk")
    with pytest.raises(EdgetuneError, match="not a GGUF imatrix file"):
        imatrix.read(tmp_path / "legacy.dat")


@pytest.fixture(scope="module")
def data_run(tiny_model, tmp_path_factory):
    """A training run whose edgetune_run.yaml names its data (48 records, 10% held out)."""
    run = build_adapter(tiny_model, tmp_path_factory.mktemp("imatrix-run") / "run")
    records = [{"instruction": f"Say the number {i} in words.", "output": f"{i} is a number."}
               for i in range(48)]
    data = write_jsonl(run.parent / "train.jsonl", records)
    settings = {"model": str(tiny_model), "data": str(data), "eval_split": 0.1, "seed": 0, "seq_len": 64}
    (run / "edgetune_run.yaml").write_text(yaml.safe_dump(settings))
    return run


def test_export_computes_saves_and_uses_the_imatrix(data_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(data_run), "--gguf", "q4_0", "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "computing the importance matrix over" in said and "train.jsonl" in said
    assert sorted(p.name for p in out.iterdir()) == ["edgetune_export.yaml", "imatrix.gguf",
                                                     "model-q4_0.Modelfile", "model-q4_0.gguf",
                                                     "report.json", "report.md"]
    saved = imatrix.read(out / "imatrix.gguf")
    assert sorted(saved.sums) == NAMES and saved.datasets[0].endswith("train.jsonl")
    rows = {r["format"]: r for r in json.loads((out / "report.json").read_text())}
    # The f16 file llama.cpp quantized from is checked against the tight f16 gate, then dropped.
    assert rows["gguf f16"]["passed"] and "intermediate" in rows["gguf f16"]["note"]
    assert "importance matrix imatrix.gguf" in rows["gguf q4_0"]["note"]
    again = tmp_path / "again"
    assert cli.main(["export", str(data_run), "--gguf", "q4_0", "--output", str(again),
                     "--imatrix", str(out / "imatrix.gguf"), "--no-verify"]) == 0
    assert (again / "model-q4_0.gguf").read_bytes() == (out / "model-q4_0.gguf").read_bytes()
    plain = tmp_path / "plain"
    assert cli.main(["export", str(data_run), "--gguf", "q4_0", "--output", str(plain),
                     "--imatrix", "none", "--no-verify"]) == 0
    assert not (plain / "imatrix.gguf").exists()
    assert (plain / "model-q4_0.gguf").read_bytes() != (out / "model-q4_0.gguf").read_bytes()


def test_bad_imatrix_input_is_one_line_and_writes_nothing(data_run, tiny_model, tmp_path, capsys):
    other = tmp_path / "other.gguf"
    imatrix.write(imatrix.Imatrix({"blk.9.attn_q.weight": np.ones((1, 64))}, {"blk.9.attn_q.weight":
                                  np.array([3.0])}, ["x"], 1, 512), other)
    out = tmp_path / "out"
    assert cli.main(["export", str(data_run), "--gguf", "q4_k_m", "--output", str(out),
                     "--imatrix", str(other)]) == 1
    assert "was made for another model: it has blk.9.attn_q.weight" in capsys.readouterr().err
    assert cli.main(["export", str(tiny_model), "--gguf", "iq2_xs", "--output", str(out)]) == 1
    assert ("--gguf iq2_xs: llama.cpp makes it only with an importance matrix, and there is none"
            in capsys.readouterr().err)
    assert cli.main(["export", str(data_run), "--gguf", "q5_k_x", "--output", str(out)]) == 1
    assert "--gguf q5_k_x: unknown type; valid types:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]
