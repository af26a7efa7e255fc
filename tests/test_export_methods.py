"""Exporting every method: merged and verified where it folds into the weights, a soft prompt beside
the base GGUF where it learns input embeddings, a one-line refusal elsewhere (tests/test_bad_input.py)."""

import json

import numpy as np
import pytest
import yaml
from conftest import build_method_adapter

from edgetune import cli


def make_run(tiny_model, tmp_path, method: str):
    """A folder shaped like `edgetune train`'s output for `method`."""
    run = build_method_adapter(tiny_model, tmp_path / "run", method)
    records = [{"instruction": f"Say {i} twice.", "output": f"{i} {i}"} for i in range(12)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {"model": str(tiny_model), "method": method, "eval_data": str(tmp_path / "eval.jsonl")}
    (run / "edgetune_run.yaml").write_text(yaml.safe_dump(settings))
    return run


@pytest.mark.parametrize("method,flags,files", [
    ("dora", ["--gguf", "f16", "--onnx", "fp32"], ["model-f16.gguf", "onnx-fp32"]),
    ("ia3", ["--gguf", "f16"], ["model-f16.gguf"]),
    ("adalora", ["--gguf", "f16", "--gguf-adapter"], ["model-f16.gguf", "adapter.gguf"]),
])
def test_weight_methods_merge_and_verify(method, flags, files, tiny_model, tmp_path, capsys):
    run = make_run(tiny_model, tmp_path, method)
    assert cli.main(["export", str(run), *flags]) == 0
    out = run / "export"
    assert all((out / f).exists() for f in files)
    rows = json.loads((out / "report.json").read_text())
    assert len(rows) == len(files) and all(r["passed"] for r in rows)
    assert f"merging {run} ({'DoRA IA3 AdaLoRA'.split()[['dora', 'ia3', 'adalora'].index(method)]})" \
        in capsys.readouterr().out


@pytest.fixture(scope="module")
def soft_export(tiny_model, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("soft")
    run = make_run(tiny_model, tmp_path, "ptuning")
    assert cli.main(["export", str(run), "--gguf", "f16,q8_0"]) == 0
    return run


def test_soft_prompt_travels_beside_the_base_gguf(soft_export):
    out = soft_export / "export"
    assert sorted(p.name for p in out.iterdir()) == ["base-f16.gguf", "base-q8_0.gguf",
                                                     "edgetune_export.yaml", "report.json",
                                                     "report.md", "soft-prompt.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "soft-prompt.safetensors"), "np") as f:
        assert f.metadata()["method"] == "ptuning" and f.get_tensor("embeddings").shape == (5, 64)
    rows = json.loads((out / "report.json").read_text())
    assert [r["format"] for r in rows] == ["gguf f16 after the soft prompt",
                                           "gguf q8_0 after the soft prompt"]
    assert all(r["passed"] for r in rows) and rows[0]["top1_agreement"] >= 0.99


def test_soft_prompt_is_what_makes_llama_cpp_agree(soft_export, tiny_model):
    """Against the torch model with the soft prompt, llama.cpp agrees after the same vectors, and
    clearly does not without them: verification would catch a base model exported alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.llama import gguf_logits
    from edgetune.export.soft_prompt import load, logits_with

    embeddings = load(soft_export / "export" / "soft-prompt.safetensors")
    ids = list(np.random.default_rng(0).integers(3, 300, 65))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        reference = logits_with(model, torch.tensor([ids]), embeddings)[0, :-1].numpy()
    gguf = soft_export / "export" / "base-f16.gguf"
    after, _ = gguf_logits(gguf, ids, soft_prompt=embeddings)
    alone, _ = gguf_logits(gguf, ids)
    assert np.abs(after - reference).max() < 0.02
    assert np.abs(alone - reference).max() > 0.1


def test_soft_prompt_answers_as_in_torch(soft_export, capsys):
    """Greedy answers through llama.cpp (edgetune run --soft-prompt) equal PEFT's in torch."""
    from edgetune.export.run import torch_and_llama_answers

    out = soft_export / "export"
    records = [{"instruction": f"Say {i} twice.", "output": ""} for i in range(3)]
    pairs = torch_and_llama_answers(soft_export, out / "base-f16.gguf", out / "soft-prompt.safetensors",
                                    records, max_tokens=6)
    assert all(torch_answer == llama_answer for torch_answer, llama_answer in pairs), pairs
    assert cli.main(["run", str(out / "base-f16.gguf"), "--prompt", "Say 0 twice.", "--max-tokens", "6",
                     "--ctx", "128", "--soft-prompt", str(out / "soft-prompt.safetensors")]) == 0
    assert capsys.readouterr().out.strip() == pairs[0][1]
