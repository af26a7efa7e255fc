"""The command line: one-line errors, YAML + flags, and no torch import where none is needed."""

import subprocess
import sys

import pytest

from edgetune.cli import VERBS, main
from edgetune.config import build
from edgetune.errors import EdgetuneError
from edgetune.train.config import TrainConfig
from edgetune.units import parse_size


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetune", *args], capture_output=True, text=True)


@pytest.mark.parametrize("text", ["8gb", "8GB", "8G", "8GiB", "8 gib", "8 GiB", "8192mb"])
def test_sizes_are_binary(text):
    assert parse_size(text) == 8 * 2**30


@pytest.mark.parametrize("text", ["eight", "8 pb", "", "-1g"])
def test_bad_size(text):
    with pytest.raises(EdgetuneError, match="cannot read size"):
        parse_size(text)


def test_help_imports_no_torch():
    code = ("import sys\nfrom edgetune.cli import main\nfor verb in {verbs!r}:\n"
            "    try:\n        main([verb, '--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code.format(verbs=list(VERBS))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: d.jsonl\nrank: 4\nlr: 0.001\nseq-len: 128\n")
    config = build(TrainConfig, str(yaml_file), {"rank": 8})
    assert (config.rank, config.lr, config.seq_len, config.data) == (8, 0.001, 128, "d.jsonl")


def test_unknown_yaml_key_is_named(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: d.jsonl\nlearning_rate: 0.1\n")
    with pytest.raises(EdgetuneError, match="unknown key 'learning_rate'"):
        build(TrainConfig, str(yaml_file), {})


def test_bad_yaml_value_is_named(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: d.jsonl\nrank: lots\n")
    with pytest.raises(EdgetuneError, match="rank: 'lots' is not a valid int"):
        build(TrainConfig, str(yaml_file), {})


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "missing.jsonl"], "edgetune: data file missing.jsonl does not exist"),
    (["train"], "edgetune: no training data: pass --data"),
    (["train", "--data", "{data}", "--model", "no/such/dir/model"],
     "edgetune: model no/such/dir/model does not exist"),
    (["train", "--data", "{data}", "--rank", "0"], "edgetune: --rank must be at least 1, got 0"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, alpaca_file, args, message):
    args = [a.replace("{data}", str(alpaca_file)) for a in args]
    result = run_cli(*args, "--output", str(tmp_path / "run"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message or message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_unsupported_architecture_is_refused(tmp_path, alpaca_file):
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(EdgetuneError, match="no-such-arch"):
        main_or_raise(["train", "--model", str(folder), "--data", str(alpaca_file),
                       "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def main_or_raise(argv: list[str]) -> None:
    """Run a verb in-process, raising its EdgetuneError instead of printing it."""
    import importlib

    from edgetune.cli import VERBS as verbs
    from edgetune.cli import _settings_class, parser
    from edgetune.config import overrides_from

    args = parser(argv[0]).parse_args(argv)
    cls = _settings_class(argv[0])
    overrides = overrides_from(args, cls)
    importlib.import_module(verbs[argv[0]][2]).main(build(cls, None, overrides))


def test_no_verb_prints_help():
    assert main([]) == 2


def test_cli_reference_is_current():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "cli_reference.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
