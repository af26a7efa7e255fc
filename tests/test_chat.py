"""`edgetune export` end to end on a tiny run, `edgetune run`, chat templates and Modelfiles."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import CHATML, build_adapter, requires_smollm2

from edgetune import cli
from edgetune.errors import EdgetuneError
from edgetune.export.config import ExportConfig
from edgetune.export.llama import load_llama
from edgetune.export.modelfile import chatml_default_system, modelfile_text
from edgetune.export.run import _prompt_and_stops, answer, render_template

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory, alpaca_records):
    """A folder shaped like `edgetune train`'s output: PEFT adapter plus edgetune_run.yaml."""
    run = build_adapter(tiny_model, tmp_path_factory.mktemp("runs") / "run")
    eval_file = run.parent / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records))
    settings = {"model": str(tiny_model), "cache_dir": None, "eval_data": str(eval_file), "rank": 4}
    (run / "edgetune_run.yaml").write_text(yaml.safe_dump(settings))
    return run


@pytest.fixture(scope="module")
def alpaca_records():
    return [{"instruction": f"What is the capital of France? Say it {i} times.",
             "output": "Paris " * (i + 1)} for i in range(12)]


@pytest.fixture(scope="module")
def exported(run_dir):
    assert cli.main(["export", str(run_dir), "--gguf", "f16", "--gguf-adapter"]) == 0
    return run_dir / "export"


def test_export_writes_verified_files(exported, capsys):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["adapter.Modelfile", "adapter.gguf", "base-f16.gguf", "edgetune_export.yaml",
                     "model-f16.Modelfile", "model-f16.gguf", "report.json", "report.md"]
    rows = json.loads((exported / "report.json").read_text())
    page = (exported / "report.md").read_text()
    assert "| model-f16.gguf | gguf f16 |" in page and page.count("| ok |") == 2
    assert [r["format"] for r in rows] == ["gguf f16", "gguf adapter over f16"]
    assert all(r["passed"] and r["positions"] == 256 and r["relative_kld"] < 0.001 for r in rows)
    assert "FROM ./base-f16.gguf\nADAPTER ./adapter.gguf" in (exported / "adapter.Modelfile").read_text()
    assert not list(exported.parent.glob(".export.tmp-*"))


def test_existing_output_is_refused(exported, run_dir, capsys):
    assert cli.main(["export", str(run_dir), "--gguf", "f16"]) == 1
    assert "holds an export: pass --force" in capsys.readouterr().err


def test_plain_model_exports_as_is(tiny_model, tmp_path):
    out = tmp_path / "plain"
    assert cli.main(["export", str(tiny_model), "--gguf", "q4_0", "--output", str(out),
                     "--no-verify"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["edgetune_export.yaml", "model-q4_0.Modelfile",
                                                     "model-q4_0.gguf"]


def test_config_validation():
    with pytest.raises(EdgetuneError, match="--gguf q3_k: unknown type; valid types: f16, bf16, q8_0, "
                                            "q4_0, q4_1, .*, iq4_xs, .*, iq1_s$"):
        ExportConfig(run="r", gguf="q8_0,q3_k")
    with pytest.raises(EdgetuneError, match="--imatrix nosuch.gguf: no such file; pass auto, none"):
        ExportConfig(run="r", gguf="q4_k_m", imatrix="nosuch.gguf")
    with pytest.raises(EdgetuneError, match="no format asked for"):
        ExportConfig(run="r")
    assert ExportConfig(run="r", gguf="Q8_0, f16,q8_0").gguf_types == ["q8_0", "f16"]


def test_export_flags_do_not_import_torch():
    code = ("import sys; from edgetune import cli; cli.parser('export'); cli.parser('run'); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_prompt_uses_the_gguf_chat_template(exported):
    llm = load_llama(exported / "model-f16.gguf", n_ctx=64, logits_all=False)
    try:
        text, stops = _prompt_and_stops(llm, "Hi", None)
    finally:
        llm.close()
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert stops == ["<|im_end|>"]


def test_run_answers_with_and_without_lora(exported, capsys):
    plain = answer(exported / "model-f16.gguf", "Hi", max_tokens=8)
    tuned = answer(exported / "base-f16.gguf", "Hi", max_tokens=8, lora=exported / "adapter.gguf")
    # base + adapter in llama.cpp answers as the merged model does (greedy, temperature 0)
    assert plain and tuned == plain
    assert cli.main(["run", str(exported / "model-f16.gguf"), "--prompt", "Hi", "--max-tokens", "4"]) == 0
    assert cli.main(["run", str(exported / "missing.gguf"), "--prompt", "Hi"]) == 1
    assert "missing.gguf does not exist" in capsys.readouterr().err


def test_chatml_template_to_modelfile():
    assert render_template(CHATML, [{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chatml_default_system(CHATML) == (True, None)
    assert chatml_default_system(SMOL_TEMPLATE) == (True, "You are SmolLM")
    text = modelfile_text("m.gguf", SMOL_TEMPLATE, ["<|im_end|>"])
    assert 'SYSTEM """You are SmolLM"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    other = modelfile_text("m.gguf", "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]", [])
    assert "TEMPLATE" not in other.replace("write a TEMPLATE line", "")


@requires_smollm2
def test_smollm2_knows_paris(smollm2_export):
    reply = answer(smollm2_export / "model-f16.gguf", "What is the capital of France?", max_tokens=48)
    assert "Paris" in reply


def test_held_out_ids_are_the_runs_eval_data(tiny_model, run_dir):
    from transformers import AutoTokenizer

    from edgetune.export.heldout import held_out_ids, run_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = yaml.safe_load((run_dir / "edgetune_run.yaml").read_text())
    train, held = run_examples(settings, tokenizer)
    assert train == [] and len(held) == 12  # the run names no --data; its --eval-data has 12 records
    ids = held_out_ids(tokenizer, held, 40)
    assert len(ids) == 41 and tokenizer.decode(ids).startswith("<|im_start|>user\nWhat is the capital")


def test_run_examples_repeat_the_trainers_split(tiny_model, alpaca_file):
    from transformers import AutoTokenizer

    from edgetune.export.heldout import run_examples
    from edgetune.records import read_jsonl
    from edgetune.train.data import encode, split

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = {"data": str(alpaca_file), "eval_split": 0.1, "seed": 3, "seq_len": 64}
    train, held = run_examples(settings, tokenizer)
    examples = [e.input_ids for e in encode(tokenizer, *read_jsonl(alpaca_file))]
    assert (train, held) == split(examples, 0.1, 3) and len(held) == 4


def test_target_picks_formats_from_the_device_profile(tiny_model, monkeypatch):
    from edgetune.devices import selection
    from edgetune.export.command import plan_formats

    monkeypatch.setattr(selection, "choose_export", lambda name, model_dir, ctx, unavailable: ["onnx-generic:int8"])
    formats = plan_formats(ExportConfig(run="r", target="pi"), tiny_model)
    assert (formats.gguf, formats.onnx, formats.onnx_generic) == ([], ["int8"], True)
    explicit = plan_formats(ExportConfig(run="r", target="rpi5-8gb", gguf="q8_0"), tiny_model)
    assert (explicit.gguf, explicit.onnx) == (["q8_0"], [])
