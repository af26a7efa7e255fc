"""Several adapter GGUFs applied at once in llama.cpp, with scales, against PEFT with both adapters
active at those scales; the `--lora FILE:SCALE` flag; and what an Ollama Modelfile can carry."""

import numpy as np
import pytest
import torch
from conftest import build_adapter

from edgetune import cli
from edgetune.config import build
from edgetune.errors import EdgetuneError
from edgetune.export.config import RunConfig, adapter_and_scale
from edgetune.export.gguf import write_adapter_gguf, write_gguf
from edgetune.export.llama import gguf_logits
from edgetune.export.modelfile import adapter_lines, modelfile_text
from edgetune.export.run import answer

IDS = list(np.random.default_rng(1).integers(3, 300, 97))
SCALES = (0.7, 0.3)


@pytest.fixture(scope="module")
def ggufs(tiny_model, tmp_path_factory):
    """The tiny base as f16 GGUF and two adapters (plain and rsLoRA) as adapter GGUFs."""
    root = tmp_path_factory.mktemp("stack")
    write_gguf(tiny_model, root / "base.gguf", "f16")
    runs = [build_adapter(tiny_model, root / "a", rank=4, alpha=8.0, seed=1),
            build_adapter(tiny_model, root / "b", rank=4, alpha=8.0, rslora=True, seed=2)]
    for run in runs:
        write_adapter_gguf(tiny_model, run, root / f"{run.name}.gguf")
    return root, runs


def peft_logits(model_dir, runs, scales):
    """Logits of the torch model with every adapter active at its scale (PEFT's own multi-adapter)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, runs[0], adapter_name="0")
    for i, run in enumerate(runs[1:], 1):
        model.load_adapter(run, adapter_name=str(i))
    model.base_model.set_adapter([str(i) for i in range(len(runs))])
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for i, scale in enumerate(scales):
                module.set_scale(str(i), scale)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0, :-1].numpy()


def test_stacked_adapters_match_peft_at_their_scales(tiny_model, ggufs):
    root, runs = ggufs
    reference = peft_logits(tiny_model, runs, SCALES)
    adapters = [(root / "a.gguf", SCALES[0]), (root / "b.gguf", SCALES[1])]
    logits, _ = gguf_logits(root / "base.gguf", IDS, adapters=adapters)
    assert float((logits.argmax(-1) == reference.argmax(-1)).mean()) >= 0.98  # f16 base: near-ties flip
    assert np.abs(logits - reference).max() < 0.02
    alone, _ = gguf_logits(root / "base.gguf", IDS, adapters=adapters[:1])
    assert np.abs(alone - reference).max() > 0.1  # the second adapter does change the output


def test_run_stacks_adapters_from_the_command_line(ggufs, capsys):
    root, _ = ggufs
    argv = ["run", str(root / "base.gguf"), "--prompt", "Hi", "--max-tokens", "6",
            "--lora", f"{root / 'a.gguf'}:0.7", "--lora", f"{root / 'b.gguf'}:0.3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip()
    adapters = [(root / "a.gguf", 0.7), (root / "b.gguf", 0.3)]
    assert printed == answer(root / "base.gguf", "Hi", max_tokens=6, adapters=adapters)
    assert cli.main(["run", str(root / "base.gguf"), "--prompt", "Hi", "--lora",
                     f"{root / 'missing.gguf'}:0.5"]) == 1
    assert f"{root / 'missing.gguf'} does not exist" in capsys.readouterr().err


def test_an_adapter_for_another_base_is_refused_among_several(tiny_factory, ggufs, tmp_path):
    root, _ = ggufs
    qwen2 = tiny_factory("qwen2")
    write_adapter_gguf(qwen2, build_adapter(qwen2, tmp_path / "q"), tmp_path / "q.gguf")
    refusal = "with adapter q.gguf: q.gguf is a qwen2 adapter; base.gguf is llama"
    with pytest.raises(EdgetuneError, match=refusal):
        gguf_logits(root / "base.gguf", IDS[:8], adapters=[(root / "a.gguf", 1.0),
                                                          (tmp_path / "q.gguf", 1.0)])


@pytest.mark.parametrize("item,expected", [
    ("a.gguf", ("a.gguf", 1.0)), ("a.gguf:0.7", ("a.gguf", 0.7)), ("dir/a.gguf:-0.5", ("dir/a.gguf", -0.5)),
    ("C:/models/a.gguf", ("C:/models/a.gguf", 1.0)), ("a.gguf:1e-1", ("a.gguf", 0.1)),
])
def test_lora_flag_takes_an_optional_scale(item, expected):
    assert adapter_and_scale(item) == expected


def test_lora_flag_repeats_on_the_command_line_and_in_yaml(tmp_path):
    from edgetune.cli import parser
    from edgetune.config import overrides_from

    args = parser("run").parse_args(["run", "m.gguf", "--prompt", "p", "--lora", "a.gguf:0.7",
                                     "--lora", "b.gguf"])
    config = build(RunConfig, None, overrides_from(args, RunConfig))
    assert config.adapters == [("a.gguf", 0.7), ("b.gguf", 1.0)]
    one = tmp_path / "run.yaml"
    one.write_text("model: m.gguf\nprompt: p\nlora: a.gguf:0.5\n")
    assert build(RunConfig, str(one)).adapters == [("a.gguf", 0.5)]
    with pytest.raises(EdgetuneError, match="--lora a.gguf:inf: the scale must be a finite number"):
        build(RunConfig, None, {"model": "m.gguf", "prompt": "p", "lora": ["a.gguf:inf"]})


def test_ollama_modelfile_takes_one_adapter_at_scale_one():
    assert adapter_lines([("adapter.gguf", 1.0)]) == ["ADAPTER ./adapter.gguf"]
    text = modelfile_text("base-f16.gguf", None, [], [("adapter.gguf", 1.0)])
    assert text.startswith("FROM ./base-f16.gguf\nADAPTER ./adapter.gguf\n")
    with pytest.raises(EdgetuneError, match="Ollama applies one ADAPTER per model, not a.gguf \\+ b.gguf"):
        adapter_lines([("a.gguf", 0.7), ("b.gguf", 0.3)])
    with pytest.raises(EdgetuneError, match="Ollama's ADAPTER has no scale \\(a.gguf at 0.7\\)"):
        adapter_lines([("a.gguf", 0.7)])
