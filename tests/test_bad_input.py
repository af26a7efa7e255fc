"""The catalogue of users' mistakes: each ends with one `edgetune:` line naming the value, a non-zero
exit, no traceback, and nothing written where the output would have gone."""

import json
import shutil

import pytest
from conftest import build_adapter, build_method_adapter, write_jsonl

from edgetune import cli

ALPACA = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(12)]


def fails(capsys, argv: list[str], expected: str) -> str:
    """Run the CLI in-process; it must fail with exactly one stderr line that contains `expected`."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"{argv} succeeded"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgetune: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ALPACA)


def train_argv(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--steps", "1",
            "--no-progress", "--dtype", "fp32", "--seq-len", "64", *extra]


@pytest.mark.parametrize("content,expected", [
    (b"\x00\x01\x02PK\x03\x04" * 50, "a NUL byte: this is a binary file"),
    ('{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at column 14)"),
    (b"", "has no records"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a",\n', "data.jsonl:2: not valid JSON"),
    (b'{"instruction": 5, "output": "b"}\n', "needs a string 'instruction'"),
    (b'[1, 2]\n', "expected a JSON object, got list"),
])
def test_bad_data_files(tiny_model, tmp_path, capsys, content, expected):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(content)
    fails(capsys, train_argv(tiny_model, bad, tmp_path / "run"), expected)
    assert not (tmp_path / "run").exists()


def test_data_that_is_a_folder(tiny_model, tmp_path, capsys):
    fails(capsys, train_argv(tiny_model, tmp_path, tmp_path / "run"), "is a folder; pass a .jsonl file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,expected", [
    (b"lr: 0.1\nlearning_rate: 2\n", "unknown key 'learning_rate'"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    (b"- a\n- b\n", "expected a mapping"),
    (b"lr: [1\n", "not valid YAML"),
    (b"rank: many\n", "rank: 'many' is not a valid int"),
])
def test_bad_settings_files(tiny_model, data, tmp_path, capsys, content, expected):
    settings = tmp_path / "run.yaml"
    settings.write_bytes(content)
    fails(capsys, ["train", str(settings), *train_argv(tiny_model, data, tmp_path / "run")[1:]], expected)
    assert not (tmp_path / "run").exists()


def copy_model(tiny_model, tmp_path, drop: tuple[str, ...] = ()):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    for name in drop:
        (folder / name).unlink()
    return folder


def test_model_folders_missing_what_training_needs(tiny_model, data, tmp_path, capsys):
    no_tokenizer = copy_model(tiny_model, tmp_path, drop=("tokenizer.json",))
    fails(capsys, train_argv(no_tokenizer, data, tmp_path / "run"), "has no tokenizer")
    shutil.rmtree(no_tokenizer)
    no_weights = copy_model(tiny_model, tmp_path, drop=("model.safetensors",))
    fails(capsys, train_argv(no_weights, data, tmp_path / "run"), "has no weights")
    (no_weights / "config.json").unlink()
    fails(capsys, train_argv(no_weights, data, tmp_path / "run"), "has no config.json: pass a Hugging "
          "Face model folder (config.json, safetensors weights, tokenizer), a .gguf file or a built-in")
    (no_weights / "model.gguf").write_bytes(b"GGUF")
    fails(capsys, train_argv(no_weights, data, tmp_path / "run"),
          f"has no config.json but holds model.gguf: pass --model {no_weights / 'model.gguf'}")
    assert not (tmp_path / "run").exists()


def test_architecture_the_trainer_does_not_support(tiny_model, data, tmp_path, capsys):
    """gpt2 is a causal LM transformers builds, but its decoder is not laid out as the trainer needs."""
    folder = copy_model(tiny_model, tmp_path)
    config = json.loads((folder / "config.json").read_text()) | {"model_type": "gpt2"}
    (folder / "config.json").write_text(json.dumps(config))
    fails(capsys, train_argv(folder, data, tmp_path / "run"), "'gpt2' is not one edgetune can fine-tune")
    assert not (tmp_path / "run").exists()


def test_truncated_weights(tiny_model, data, tmp_path, capsys):
    folder = copy_model(tiny_model, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    fails(capsys, train_argv(folder, data, tmp_path / "run"), "truncated or damaged")
    assert not (tmp_path / "run").exists()
    fails(capsys, ["export", str(folder), "--gguf", "f16", "--output", str(tmp_path / "out")],
          "truncated or damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "model"]


def test_truncated_gguf(tiny_model, data, tmp_path, capsys, monkeypatch):
    from edgetune.export.gguf import write_gguf

    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    whole = tmp_path / "model.gguf"
    write_gguf(tiny_model, whole, "f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    fails(capsys, train_argv(cut, data, tmp_path / "run"), "is not a readable GGUF file")
    fails(capsys, ["plan", "--ram", "8gb", "--model", str(cut)], "is not a readable GGUF file")
    fails(capsys, ["run", str(cut), "--prompt", "Hi"], "llama.cpp cannot load cut.gguf")
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))


def test_paths_that_do_not_exist(tiny_model, data, tmp_path, capsys):
    missing = tmp_path / "runs" / "mine"
    missing.parent.mkdir()
    fails(capsys, ["export", str(missing), "--gguf", "q8_0"], f"{missing} does not exist")
    fails(capsys, train_argv(tmp_path / "nope", data, tmp_path / "run"), "does not exist")
    fails(capsys, train_argv(tiny_model, tmp_path / "none.jsonl", tmp_path / "run"), "does not exist")
    fails(capsys, ["report", str(missing)], "is not a folder")
    fails(capsys, ["report", str(tmp_path)], "neither a run folder")


@pytest.fixture
def run_with_adapter(tiny_model, tmp_path):
    run = build_adapter(tiny_model, tmp_path / "run")
    (run / "edgetune_run.yaml").write_text(f"model: {tiny_model}\n")
    return run


def test_truncated_adapter(run_with_adapter, capsys):
    weights = run_with_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    fails(capsys, ["export", str(run_with_adapter), "--gguf", "f16"], "truncated or damaged")
    assert not (run_with_adapter / "export").exists()
    assert not list(run_with_adapter.parent.glob("*.tmp-*"))


def test_damaged_run_files(run_with_adapter, capsys):
    (run_with_adapter / "adapter_config.json").write_text("{not json")
    fails(capsys, ["export", str(run_with_adapter), "--gguf", "f16"], "adapter_config.json: cannot read")
    (run_with_adapter / "edgetune_run.yaml").write_bytes(b"\xff\x00")
    fails(capsys, ["export", str(run_with_adapter), "--gguf", "f16"], "not a readable run file")
    assert not (run_with_adapter / "export").exists()


@pytest.mark.parametrize("argv,expected", [
    (["export", "run", "--gguf", "q9_9"], "--gguf q9_9: unknown type"),
    (["train", "--data", "x.jsonl", "--steps", "0"], "--steps must be at least 1"),
    (["train", "--data", "x.jsonl", "--eval-split", "1.5"], "--eval-split must be in [0, 1)"),
    (["plan", "--ram", "abc"], "cannot read size 'abc'"),
    (["plan", "--ram", "8gb", "--model", "gpt-9"], "model gpt-9 is neither a folder"),
])
def test_bad_flags(capsys, argv, expected):
    fails(capsys, argv, expected)


@pytest.mark.parametrize("argv,expected", [
    (["train", "--data", "x.jsonl", "--method", "prompt", "--virtual-tokens", "0"],
     "--virtual-tokens must be at least 1, got 0"),
    (["train", "--data", "x.jsonl", "--method", "adalora", "--rank", "8", "--init-rank", "4"],
     "--init-rank 4 is below --rank 8"),
    (["train", "--data", "x.jsonl", "--init-rank", "12"], "--init-rank is AdaLoRA's; --method lora"),
    (["train", "--data", "x.jsonl", "--method", "prefix", "--target-modules", "q_proj"],
     "--target-modules does not apply to --method prefix"),
    (["train", "--data", "x.jsonl", "--method", "lokr"], "argument --method: invalid choice: 'lokr'"),
])
def test_bad_method_flags(capsys, argv, expected):
    if "lokr" in argv:  # argparse's own refusal: usage line plus the error, exit 2
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and expected in capsys.readouterr().err
        return
    fails(capsys, argv, expected)


def test_method_that_does_not_fit_the_model(tiny_model, data, tmp_path, capsys):
    fails(capsys, train_argv(tiny_model, data, tmp_path / "run", "--method", "ia3", "--target-modules",
                             "c_attn,k_proj"), "--method ia3 --target-modules c_attn,k_proj: the model has no c_attn; "
                             "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_method(tiny_model, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_argv(tiny_model, data, run, "--method", "ia3")) == 0
    capsys.readouterr()
    before = sorted(p.name for p in run.rglob("*"))
    fails(capsys, ["train", "--resume", "--output", str(run), "--method", "dora"],
          "--method cannot change in a running run (recorded 'ia3', given 'dora')")
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("method,flags,expected", [
    ("dora", ["--gguf-adapter"], "--gguf-adapter: DoRA is not a llama.cpp LoRA adapter"),
    ("ia3", ["--gguf", "f16", "--gguf-adapter"], "--gguf-adapter: IA3 is not a llama.cpp LoRA adapter"),
    ("prompt", ["--gguf-adapter"], "--gguf-adapter: prompt tuning is not a llama.cpp LoRA adapter"),
    ("ptuning", ["--gguf", "q8_0", "--onnx", "int8"], "--onnx: P-tuning learns inputs, not weights"),
    ("prefix", ["--gguf", "q8_0"], "--gguf: prefix tuning's per-layer keys and values cannot"),
])
def test_export_formats_that_cannot_carry_the_method(tiny_model, tmp_path, capsys, method, flags,
                                                    expected):
    run = build_method_adapter(tiny_model, tmp_path / "run", method)
    (run / "edgetune_run.yaml").write_text(f"model: {tiny_model}\nmethod: {method}\n")
    capsys.readouterr()  # transformers' loading bar while the adapter was built
    fails(capsys, ["export", str(run), *flags], expected)
    assert not (run / "export").exists() and not list(run.parent.glob("*.tmp-*"))


def test_soft_prompt_files_that_cannot_be_used(tiny_model, tmp_path, capsys):
    from safetensors.numpy import save_file

    from edgetune.export.gguf import write_gguf

    write_gguf(tiny_model, tmp_path / "base.gguf", "f16")
    fails(capsys, ["run", str(tmp_path / "base.gguf"), "--prompt", "Hi", "--soft-prompt",
                   str(tmp_path / "none.safetensors")], "none.safetensors does not exist")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    fails(capsys, ["run", str(tmp_path / "base.gguf"), "--prompt", "Hi", "--soft-prompt",
                   str(tmp_path / "junk.safetensors")], "is not a readable safetensors file")
    import numpy as np

    save_file({"embeddings": np.zeros((4, 96), dtype=np.float32)}, str(tmp_path / "wide.safetensors"))
    fails(capsys, ["run", str(tmp_path / "base.gguf"), "--prompt", "Hi", "--ctx", "128", "--max-tokens",
                   "8", "--soft-prompt", str(tmp_path / "wide.safetensors")],
          "vectors have 96 values but this model's")
