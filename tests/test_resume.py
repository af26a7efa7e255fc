"""Resuming: the run's own settings, a log with every step once, exact state without pickle, and
runs killed with SIGKILL (inside a checkpoint write too) that end with the uninterrupted adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetune.config import build
from edgetune.errors import EdgetuneError
from edgetune.train import checkpoint, statefile
from edgetune.train.command import train
from edgetune.train.config import TrainConfig
from edgetune.train.resume import truncate_log

ROOT = Path(__file__).resolve().parents[1]


def config(tiny_model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model), data=str(data), output=str(out), dtype="fp32", steps=8,
                    batch_size=4, seq_len=64, lr=1e-2, rank=4, eval_every=4, save_every=2,
                    progress=False, seed=0, threads=1)
    return TrainConfig(**{**settings, **overrides})


def interrupt_at(target: int):
    def on_step(step: int) -> None:
        if step == target:
            raise KeyboardInterrupt

    return on_step


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def adapter(run: Path) -> bytes:
    return (run / "adapter_model.safetensors").read_bytes()


def test_resume_keeps_the_recorded_settings_and_says_what_changed(tiny_model, alpaca_file, tmp_path,
                                                                  capsys):
    run = tmp_path / "run"
    cut = train(config(tiny_model, alpaca_file, run, keep_checkpoints=0), interrupt_at(5))
    assert cut.interrupted and cut.exit_status == 130 and steps_logged(run) == [1, 2, 3, 4, 5]
    # as the CLI builds it: only --resume, --output and --save-every were given
    resumed = build(TrainConfig, None, {"resume": True, "output": str(run), "save_every": 7})
    assert resumed.given == {"resume", "output", "save_every"}
    assert train(resumed).steps == 8
    out = capsys.readouterr().out
    assert (f"resuming {run} at step 5 of 8 with its recorded settings; "
            "changed: --save-every 2 -> 7") in out
    # --keep-checkpoints 0 (all) came from the run, not the default 2; from step 5 on, every 7th
    assert [checkpoint.step_of(p) for p in checkpoint.completed(run)] == [2, 4, 5, 7, 8]
    assert steps_logged(run) == list(range(1, 9))


def test_resume_refuses_a_setting_that_makes_another_run(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_model, alpaca_file, run), interrupt_at(3))
    before = (run / "train_log.jsonl").read_text()
    given = build(TrainConfig, None, {"resume": True, "output": str(run), "lr": 0.5})
    with pytest.raises(EdgetuneError, match=r"--lr cannot change .* \(recorded 0.01, given 0.5\)"):
        train(given)
    same = build(TrainConfig, None, {"resume": True, "output": str(run), "lr": 0.01,
                                     "data": str(alpaca_file)})
    assert (run / "train_log.jsonl").read_text() == before
    assert train(same).steps == 8  # a given setting equal to the recorded one is no change


def test_log_is_cut_back_to_the_checkpoint(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8))
                   + '{"step": 8, "lo')  # the last line was cut short by a kill
    assert truncate_log(tmp_path, 5) == 5
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]


def test_state_round_trips_exactly_without_pickle(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)},
                       7: {"qmap1": torch.arange(256, dtype=torch.uint8), "step": 2}},
             "param_groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "params": [0, 7], "eps": 1e-8,
                               "maximize": False, "foreach": None, "initial_lr": 2e-4}],
             "rng": {"python": (3, tuple(range(625)), None), "bf16": torch.ones(3, dtype=torch.bfloat16)},
             "history": [{"step": 1, "loss": float("inf")}], "__odd__": {"__tensor__": "t0"}}
    statefile.save(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    loaded = statefile.load(tmp_path)

    def same(a, b) -> None:
        assert type(a) is type(b), (a, b)
        if torch.is_tensor(a):
            assert a.dtype == b.dtype and torch.equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        else:
            assert a == b

    same(state, loaded)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_state_pt_does_not_run_code(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_model, alpaca_file, run), interrupt_at(3))
    newest = checkpoint.completed(run)[-1]
    for name in (statefile.TREE, statefile.TENSORS):
        (newest / name).unlink()
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "rng": Payload(marker)}, newest / statefile.LEGACY)
    torch.load(newest / statefile.LEGACY, weights_only=False)  # the payload is live: it runs here
    assert marker.exists()
    marker.unlink()
    with pytest.raises(EdgetuneError, match="holds more than tensors and plain values"):
        train(TrainConfig(output=str(run), resume=True, progress=False))
    assert not marker.exists()


def test_adamw8bit_resumes_exactly(tiny_model, alpaca_file, tmp_path):
    whole = train(config(tiny_model, alpaca_file, tmp_path / "whole", optim="adamw8bit", steps=6))
    train(config(tiny_model, alpaca_file, tmp_path / "cut", optim="adamw8bit", steps=6),
          interrupt_at(3))
    state = json.loads((checkpoint.completed(tmp_path / "cut")[-1] / statefile.TREE).read_text())
    assert "state1" in json.dumps(state["optimizer"])  # bitsandbytes' 8-bit moments were saved
    resumed = train(TrainConfig(output=str(tmp_path / "cut"), resume=True, progress=False))
    assert resumed.train_loss == whole.train_loss
    assert adapter(tmp_path / "cut") == adapter(tmp_path / "whole")


# Kill the process with SIGKILL at one exact point, by wrapping one function of the trainer.
KILL = """
import os, signal, sys
from edgetune import cli
from edgetune.train import checkpoint, loop, statefile

target, point = int(sys.argv[1]), sys.argv[2]
calls = []

def killer(module, name):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        calls.append(1)
        result = original(*args, **kwargs)
        if len(calls) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, wrapped)

module, name = {"checkpoint-write": (statefile, "save"), "after-log": (loop.Loop, "log"),
                "adapter-write": (checkpoint.folders, "fsync_dir")}[point]
killer(module, name)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Repeat the number {i}.", "output": f"{i} {i}"})
                            + "\n" for i in range(40)))
    train(config(tiny_model, data, folder / "run"))
    return data, adapter(folder / "run")


# (where, which call): inside the step-4 checkpoint write (state written, not yet renamed); after
# step 4 was logged, before its checkpoint; inside the final adapter write (flushed, not in place)
@pytest.mark.parametrize("point, target", [("checkpoint-write", 2), ("after-log", 4),
                                           ("adapter-write", 9)])
def test_killed_at_any_point_resumes_to_the_same_adapter(tiny_model, uninterrupted, tmp_path, point,
                                                         target):
    data, reference = uninterrupted
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model), "--data", str(data), "--output", str(run),
            "--dtype", "fp32", "--steps", "8", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2",
            "--rank", "4", "--eval-every", "4", "--save-every", "2", "--threads", "1", "--no-progress"]
    killed = subprocess.run([sys.executable, "-W", "ignore", "-c", KILL, str(target), point, *args],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -9, killed.stderr
    assert not (run / "adapter_model.safetensors").exists() or point == "adapter-write"
    train(TrainConfig(output=str(run), resume=True, progress=False))
    assert adapter(run) == reference
    assert steps_logged(run) == list(range(1, 9))
    assert not [p for p in run.rglob("*") if p.name.startswith(".")]  # no leftovers, no lock
