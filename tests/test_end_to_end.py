"""The real command line on the real SmolLM2-135M: train, export, verify, chat."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import requires_smollm2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dates"


def edgetune(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "edgetune", *args], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@requires_smollm2
def test_train_export_run_on_smollm2(tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    edgetune("train", "--model", "smollm2-135m", "--data", str(EXAMPLES / "train.jsonl"),
             "--eval-data", str(EXAMPLES / "eval.jsonl"), "--steps", "3", "--batch-size", "4",
             "--lr", "1e-3", "--save-every", "2", "--eval-every", "3", "--output", str(run),
             "--no-progress")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and "eval_loss" in log[-1]
    assert (run / "adapter_model.safetensors").is_file()

    exported = edgetune("export", str(run), "--gguf", "q8_0", "--output", str(out))
    assert "model-q8_0.gguf" in exported.stdout
    (row,) = json.loads((out / "report.json").read_text())
    assert row["passed"] and row["relative_kld"] < 0.002 and row["positions"] >= 256

    chat = edgetune("run", str(out / "model-q8_0.gguf"), "--prompt",
                    "Convert the date to ISO 8601 format (YYYY-MM-DD). Reply with the date only."
                    "\n\nJuly 17, 2017", "--max-tokens", "16")
    assert "2017" in chat.stdout
