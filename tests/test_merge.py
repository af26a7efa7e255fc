"""Merging a LoRA adapter: exact against the formula and against PEFT's own merge."""

import json
import math

import pytest
import torch
from conftest import build_adapter, build_method_adapter
from safetensors.torch import load_file, save_file

from edgetune.errors import EdgetuneError
from edgetune.export.merge import load_adapter, merge, write_safetensors


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return build_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "run", rank=4, alpha=8.0)


def test_merged_weights_equal_base_plus_scaled_update(tiny_model, adapter, tmp_path):
    merged = load_file(merge(tiny_model, adapter, tmp_path / "merged") / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    raw = load_file(adapter / "adapter_model.safetensors")
    assert set(merged) == set(base)
    prefix = "base_model.model."
    name = "model.layers.1.self_attn.q_proj"
    a, b = raw[f"{prefix}{name}.lora_A.weight"], raw[f"{prefix}{name}.lora_B.weight"]
    expected = base[name + ".weight"] + (8.0 / 4) * (b @ a)
    assert torch.equal(merged[name + ".weight"], expected)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])  # untouched
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(changed) == 2 * 7  # every linear layer of both blocks, nothing else


def test_merge_matches_peft_merge_and_unload(tiny_model, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    merged = load_file(merge(tiny_model, adapter, tmp_path / "merged") / "model.safetensors")
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)


@pytest.mark.parametrize("method,arch", [("dora", "llama"), ("dora", "qwen2"), ("ia3", "llama"),
                                         ("ia3", "qwen2"), ("adalora", "llama")])
def test_other_methods_merge_as_peft_does(method, arch, tiny_factory, tmp_path):
    """DoRA, IA3 (with qwen2's k/v biases, which IA3 scales too) and a pruned AdaLoRA, tensor by
    tensor, against PEFT's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _with_random_biases(tiny_factory(arch), tmp_path / "base")  # zero biases would hide them
    adapter = build_method_adapter(base, tmp_path / "run", method)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    merged = load_file(merge(base, adapter, tmp_path / "merged") / "model.safetensors")
    original = load_file(base / "model.safetensors")
    changed = {k for k in merged if not torch.equal(merged[k], original[k])}
    per_layer = {"dora": 7, "ia3": 3 + (2 if arch == "qwen2" else 0), "adalora": 6}[method]
    assert len(changed) == 2 * per_layer  # the adapted tensors of both blocks, nothing else
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=2e-6)


def _with_random_biases(model_dir, out):
    import shutil

    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: torch.randn_like(v) * 0.1 if k.endswith(".bias") else v for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_soft_prompts_do_not_merge(tiny_model, tmp_path):
    adapter = build_method_adapter(tiny_model, tmp_path / "run", "prompt")
    with pytest.raises(EdgetuneError, match="prompt tuning learns inputs, not weights"):
        merge(tiny_model, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_rslora_scale_is_alpha_over_sqrt_rank(tiny_model, tmp_path):
    run = build_adapter(tiny_model, tmp_path / "rs", rank=4, alpha=8.0, rslora=True)
    pairs = load_adapter(run)
    pair = pairs["model.layers.0.mlp.up_proj.weight"]
    assert (pair.rank, pair.alpha, pair.rslora) == (4, 8.0, True)  # stored as given
    assert pair.scale == 8.0 / math.sqrt(4)


def test_tied_embeddings_stay_tied(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_factory("llama", tie=True)
    run = build_adapter(base, tmp_path / "run")
    out = merge(base, run, tmp_path / "merged")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (out / "tokenizer.json").is_file()


def test_nan_in_adapter_is_refused_naming_the_tensor(tiny_model, adapter, tmp_path):
    def poison(tensors):
        key = next(k for k in tensors if "layers.1.mlp.down_proj.lora_B" in k)
        tensors[key][0, 0] = float("nan")
        return tensors

    broken = _edited_adapter(adapter, tmp_path / "broken", poison)
    with pytest.raises(EdgetuneError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has NaN"):
        merge(tiny_model, broken, tmp_path / "merged")


def _edited_adapter(adapter, out, edit):
    import shutil

    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file(edit(tensors), out / "adapter_model.safetensors")
    return out


def test_adapter_for_another_model_is_refused(tiny_model, adapter, tmp_path):
    def deeper(tensors):  # as if trained on a model with more layers
        return {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}

    def wider(tensors):  # as if trained on a model with a larger hidden size
        return {k: torch.zeros(v.shape[0], 96) if "lora_A" in k else v for k, v in tensors.items()}

    with pytest.raises(EdgetuneError, match="layers.7.* which the base model does not have"):
        merge(tiny_model, _edited_adapter(adapter, tmp_path / "deep", deeper), tmp_path / "m1")
    with pytest.raises(EdgetuneError, match="wrong base model"):
        merge(tiny_model, _edited_adapter(adapter, tmp_path / "wide", wider), tmp_path / "m2")


def test_streamed_safetensors_round_trip(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7), "c": torch.randn(2, 2, 2)}
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    write_safetensors(tmp_path / "x.safetensors", shapes, iter(reversed(list(tensors.items()))))
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
