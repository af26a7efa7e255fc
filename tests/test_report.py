"""Pictures and summaries: training.png in every run folder, report.md beside each export, and
`edgetune report`; training never depends on the plotting library."""

import json
import subprocess
import sys

from edgetune import cli
from edgetune.train.command import train
from edgetune.train.config import TrainConfig
from edgetune.train.curves import read_log

PNG = b"\x89PNG\r\n\x1a\n"


def settings(tiny_model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_model), data=str(data), output=str(out), dtype="fp32", steps=4,
                  batch_size=4, seq_len=64, lr=1e-2, rank=4, eval_every=2, save_every=2,
                  progress=False, threads=1)
    return TrainConfig(**values | overrides)


def test_curves_are_drawn_at_checkpoints_and_at_the_end(tiny_model, alpaca_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(settings(tiny_model, alpaca_file, run))
    picture = run / "training.png"
    assert picture.read_bytes()[:8] == PNG and picture.stat().st_size > 10_000
    assert not list(run.glob(".*.tmp-*"))
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4]
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "4 steps logged" in out and "eval loss" in out and "training curves" in out


def test_training_goes_on_without_matplotlib(tiny_model, alpaca_file, tmp_path):
    """A fresh interpreter where matplotlib cannot be imported trains, warns once, and draws nothing."""
    values = dict(model=str(tiny_model), data=str(alpaca_file), output=str(tmp_path / "run"),
                  dtype="fp32", steps=4, batch_size=4, seq_len=64, rank=4, save_every=2,
                  progress=False, threads=1)
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from edgetune.train.command import train\nfrom edgetune.train.config import TrainConfig\n"
            f"assert train(TrainConfig(**{values!r})).steps == 4")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("install matplotlib") == 1
    assert not (tmp_path / "run" / "training.png").exists()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_log_cut_short_by_a_kill_still_reads(tmp_path):
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_log(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_report_of_an_export_folder(tmp_path, capsys):
    row = {"file": "model-q8_0.gguf", "format": "gguf q8_0", "size_bytes": 2**20, "positions": 256,
           "top1_agreement": 0.98, "max_logit_diff": 1.5, "perplexity": 10.1, "torch_perplexity": 10.0,
           "decode_tokens_per_s": 30.0, "passed": True, "note": "", "perplexity_ratio": 1.01}
    (tmp_path / "report.json").write_text(json.dumps([row]))
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model-q8_0.gguf" in out and "1.010" in out and "ok" in out


def test_report_imports_no_torch(tmp_path):
    (tmp_path / "report.json").write_text("[]")
    code = ("import sys; from edgetune.cli import main; rc = main(['report', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
