"""Phone-native files: ExecuTorch .pte and LiteRT-LM .litertlm, round-tripped through their runtimes.

The runtimes are the optional extra edgetune[phone]: without it the round trips are skipped (saying
why) and the rest (bad input, the chat-template fix, device choice) still runs.
"""

import json
from pathlib import Path

import pytest
from conftest import CHATML, build_adapter, requires_smollm2

from edgetune import cli
from edgetune.export import phone
from edgetune.runfiles import EXPORT_CONFIG

ET_MISSING = phone.missing("executorch")
LITERT_MISSING = phone.missing("litert")
needs_executorch = pytest.mark.skipif(ET_MISSING is not None, reason=f"ExecuTorch export {ET_MISSING}")
needs_litert = pytest.mark.skipif(LITERT_MISSING is not None, reason=f"LiteRT export {LITERT_MISSING}")


def fails(capsys, argv: list[str], expected: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("edgetune: ") and expected in lines[0], err
    return lines[0]


@pytest.fixture
def installed(monkeypatch):
    """Both runtimes reported installed, so the checks after that one can be reached without them."""
    monkeypatch.setattr(phone, "missing", lambda fmt: None)


def test_runtime_not_installed_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(phone.RUNTIMES, "litert", ("LiteRT-LM", ("litert_lm", "no_such_module_x")))
    line = fails(capsys, ["export", str(tiny_model), "--litert", "int8", "--output", str(tmp_path / "out")],
                 'pip install "edgetune[phone]"')
    assert line.startswith("edgetune: --litert needs LiteRT-LM (") and "no_such_module_x" in line
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bad_phone_input_is_one_line(tiny_model, tiny_factory, tmp_path, capsys, installed):
    out, mistral = tmp_path / "out", tiny_factory("mistral")
    capsys.readouterr()
    fails(capsys, ["export", str(tiny_model), "--executorch", "8da2w", "--output", str(out)],
          "--executorch 8da2w: unknown type; valid types: fp32, 8da4w, 8da8w")
    fails(capsys, ["export", str(tiny_model), "--litert", "int2", "--output", str(out)],
          "--litert int2: unknown type; valid types: fp32, int8, int4")
    # The tiny model holds 256 positions: a 100-token cache cannot hold 256 held-out positions.
    fails(capsys, ["export", str(tiny_model), "--litert", "fp32", "--ctx", "100", "--output", str(out)],
          "--ctx 100: the litert files' KV cache cannot hold the 256 held-out positions")
    fails(capsys, ["export", str(mistral), "--executorch", "fp32", "--output", str(out)],
          "ExecuTorch export does not support MistralForCausalLM; supported architectures: llama, "
          "qwen2, qwen3")
    assert not out.exists()


def test_context_the_device_cannot_hold_is_one_line(tiny_model, tmp_path, capsys):
    line = fails(capsys, ["export", str(tiny_model), "--executorch", "8da4w", "--target", "iphone-6gb",
                          "--ctx", "50000000", "--output", str(tmp_path / "out")],
                 "does not fit iphone-6gb at context 50000000, which gives one app 3.00 GiB; --ctx ")
    assert line.startswith("edgetune: executorch:8da4w: ") and line.endswith(" fits")
    assert not (tmp_path / "out").exists()


def test_target_falls_back_when_the_phone_extra_is_missing(tmp_path, capsys, monkeypatch):
    from edgetune.devices.selection import choose_export

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    assert choose_export("android-8gb", folder, 2048) == ["executorch:8da8w"]
    assert choose_export("iphone-6gb", folder, 2048) == ["executorch:8da8w"]
    missing = {"executorch": "needs ExecuTorch", "litert": "needs LiteRT-LM"}
    assert choose_export("android-8gb", folder, 2048, missing) == ["gguf:q8_0"]
    out = capsys.readouterr().out
    assert "executorch:8da8w fits android-8gb but needs ExecuTorch" in out
    assert "litert:int8 fits android-8gb but needs LiteRT-LM" in out


def test_content_parts_become_text_before_the_template():
    """LiteRT-LM's Conversation hands the template [{"type": "text", ...}] parts; the preamble the
    bundle gets renders them exactly as the model's own template renders a string."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgetune.export.litert import CONTENT_AS_TEXT

    env = ImmutableSandboxedEnvironment()
    text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in text]
    fixed = env.from_string(CONTENT_AS_TEXT + CHATML)
    expected = env.from_string(CHATML).render(messages=text, add_generation_prompt=True)
    assert fixed.render(messages=parts, add_generation_prompt=True) == expected
    assert fixed.render(messages=text, add_generation_prompt=True) == expected
    assert expected.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_start_token_only_where_the_tokenizer_or_template_adds_it(tiny_model):
    from transformers import AutoTokenizer

    from edgetune.export.litert import needs_start_token

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # BOS <|im_start|>, written by the template
    assert tokenizer.bos_token == "<|im_start|>" and not needs_start_token(tokenizer, CHATML)
    assert needs_start_token(tokenizer, "{{ bos_token }}" + CHATML)


def test_reply_text_drops_the_runner_statistics_and_stop_token():
    chat = phone.Chat([], "", 0, "Paris.", ["<|im_end|>", "<|endoftext|>"], [2, 0])
    printed = 'Paris.<|im_end|>\nPyTorchObserver {"prompt_tokens":21,"generated_tokens":7}\n'
    assert phone.reply_text(printed, chat) == "Paris."
    # A runner printing token by token drops partial UTF-8 and control bytes a whole decode keeps.
    assert phone.skeleton("\x0e fo%\x14\ufffd%ual  6\u00e9") == phone.skeleton("fo%%ual 6") == "fo%%ual 6"


def test_prefill_and_chat_checks_can_fail_a_file(tiny_model):
    """A file whose logits match torch step by step still fails when its prefill path, its prompt's
    token count or (fp32) its chat reply differs."""
    import dataclasses

    from transformers import AutoTokenizer

    from edgetune.export.heldout import held_out_ids
    from edgetune.export.verify import torch_reference

    reference = torch_reference(tiny_model, held_out_ids(AutoTokenizer.from_pretrained(tiny_model), [], 16))
    chat = phone.Chat([], "prompt", 10, "Paris.", ["<|im_end|>"], [2])
    good = phone.Run(reference.logits, reference.logits[4:8], 4, "Paris.", 10, 5.0)

    def check(kind="fp32", **change):
        return phone.verification("f", f"executorch {kind}", kind, 1, dataclasses.replace(good, **change),
                                  reference, chat)

    assert check().passed and "chat: 'Paris.' (torch's reply)" in check().note
    shifted = check(prefilled=reference.logits[5:9])
    assert not shifted.passed and "the prefill path differs from step-by-step decoding" in shifted.note
    doubled = check(prompt_tokens=11)
    assert not doubled.passed and "read the chat prompt as 11 tokens, torch as 10" in doubled.note
    assert not check(reply="Lyon.").passed and check("8da4w", reply="Lyon.").passed
    assert "torch: 'Paris.'" in check("8da4w", reply="Lyon.").note
    no_template = phone.verification("f", "litert-lm fp32", "fp32", 1, good, reference, None)
    assert no_template.passed and "no chat template" in no_template.note


SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192}


def export(model: Path, out: Path, *flags: str) -> list[dict]:
    assert cli.main(["export", str(model), "--output", str(out), "--positions", "48", *flags]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def adapter_run(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter over the tiny model: the exports below merge it first."""
    return build_adapter(tiny_model, tmp_path_factory.mktemp("phone") / "adapter")


@needs_executorch
def test_executorch_round_trip(adapter_run, tmp_path):
    rows = export(adapter_run, tmp_path / "out", "--executorch", "fp32,8da4w", "--ctx", "128")
    fp32, q4 = rows
    assert [r["file"] for r in rows] == ["executorch-fp32/model.pte", "executorch-8da4w/model.pte"]
    assert all(r["passed"] for r in rows) and fp32["top1_agreement"] == 1.0
    assert fp32["max_logit_diff"] < 1e-3 and abs(fp32["perplexity_ratio"] - 1) < 1e-4
    assert "(torch's reply)" in fp32["note"] and "prefill then decode" in fp32["note"]
    assert q4["size_bytes"] < 0.6 * fp32["size_bytes"] and fp32["decode_tokens_per_s"] > 0
    folder = tmp_path / "out" / "executorch-fp32"
    assert {"model.pte", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(folder / "model.pte"))
    meta = {m: program.load_method(m).execute([]) for m in
            ("get_max_context_len", "get_max_seq_len", "get_eos_ids", "get_n_layers", "use_kv_cache",
             "enable_dynamic_shape", "get_max_batch_size", "get_vocab_size")}
    assert meta["get_max_context_len"] == [128] and meta["get_max_seq_len"] == [127]
    assert meta["get_eos_ids"] == [2] and meta["get_n_layers"] == [2]  # <|im_end|>: the turn's end
    assert meta["use_kv_cache"] == [True] and meta["enable_dynamic_shape"] == [True]
    assert meta["get_max_batch_size"] == [1] and meta["get_vocab_size"] == [300]


@needs_litert
def test_litert_round_trip(adapter_run, tmp_path):
    rows = export(adapter_run, tmp_path / "out", "--litert", "fp32,int8", "--ctx", "128")
    fp32, q8 = rows
    assert [r["file"] for r in rows] == ["model-fp32.litertlm", "model-int8.litertlm"]
    assert all(r["passed"] for r in rows) and fp32["top1_agreement"] == 1.0
    assert fp32["max_logit_diff"] < 1e-3 and q8["size_bytes"] < 0.6 * fp32["size_bytes"]  # + tokenizer
    assert "(torch's reply)" in fp32["note"] and "prefill then decode" in fp32["note"]
    from edgetune.export.litert_runtime import Program, tflite_bytes

    program = Program(tflite_bytes(tmp_path / "out" / "model-fp32.litertlm"))
    assert (program.length, program.prefill_length, program.vocab) == (128, 128, 300)
    # nothing but the bundles, the report and the settings: no intermediate program, no runtime cache
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model-fp32.litertlm", "model-int8.litertlm",
                                                              "report.json", "report.md", EXPORT_CONFIG}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("fmt", ["executorch", "litert"])
def test_qwen_round_trips(tiny_factory, tmp_path, arch, fmt):
    missing = phone.missing(fmt)
    if missing:
        pytest.skip(f"{fmt} export {missing}")
    (row,) = export(tiny_factory(arch), tmp_path / "out", f"--{fmt}", "fp32", "--ctx", "64")
    assert row["passed"] and row["top1_agreement"] == 1.0 and row["max_logit_diff"] < 1e-3


@requires_smollm2
@needs_litert
def test_smollm2_litert_answers_through_the_conversation_api(tmp_path):
    rows = export(Path("smollm2-135m"), tmp_path / "out", "--litert", "fp32,int8", "--ctx", "512")
    fp32, q8 = rows
    assert fp32["passed"] and fp32["top1_agreement"] == 1.0
    assert "chat: 'The capital of France is Paris.' (torch's reply)" in fp32["note"]
    assert q8["perplexity_ratio"] <= 1.05 and "Paris" in q8["note"].split("chat: ")[1]
