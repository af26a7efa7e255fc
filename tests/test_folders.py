"""What edgetune may replace, locks on the folders it writes, and what a crash leaves behind."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetune import cli, folders
from edgetune.errors import EdgetuneError
from edgetune.train.command import train
from edgetune.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def config(tiny_model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model), data=str(data), output=str(out), dtype="fp32", steps=4,
                    batch_size=4, seq_len=64, lr=1e-2, rank=4, eval_every=0, save_every=2,
                    progress=False, seed=0, threads=1)
    return TrainConfig(**{**settings, **overrides})


def edgetune(*args: str, wait: bool = True):
    command = [sys.executable, "-W", "ignore", "-m", "edgetune", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env)


def train_args(tiny_model, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
            "--dtype", "fp32", "--seq-len", "64", "--batch-size", "4", "--rank", "4",
            "--threads", "1", "--no-progress", *extra]


def users_folder(path: Path) -> Path:
    (path / "drafts").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "drafts" / "a.txt").write_text("mine too")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "drafts" / "a.txt").read_text() == "mine too"


def test_train_force_refuses_a_folder_edgetune_did_not_make(tiny_model, alpaca_file, tmp_path):
    mine = users_folder(tmp_path / "mine")
    with pytest.raises(EdgetuneError, match=r"holds drafts, notes.txt, which edgetune did not make"):
        train(config(tiny_model, alpaca_file, mine, force=True))
    assert_untouched(mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgetuneError, match="is a file"):
        train(config(tiny_model, alpaca_file, tmp_path / "file", force=True))


def test_force_replaces_its_own_run_and_an_empty_folder_is_used(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # empty: used without --force
    assert train(config(tiny_model, alpaca_file, run, steps=2)).steps == 2
    with pytest.raises(EdgetuneError, match="holds a run: pass --force"):
        train(config(tiny_model, alpaca_file, run, steps=2))
    assert train(config(tiny_model, alpaca_file, run, steps=3, force=True)).steps == 3
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3


def test_export_force_refuses_a_users_folder(tiny_model, tmp_path):
    mine = users_folder(tmp_path / "mine")
    result = edgetune("export", str(tiny_model), "--gguf", "f16", "--output", str(mine), "--force")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"edgetune: --output {mine} holds drafts")
    assert "Traceback" not in result.stderr
    assert_untouched(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_quickstart_refuses_a_users_folder_and_replaces_its_own(tmp_path):
    from edgetune.quickstart import QuickstartConfig, main, prepare_output

    mine = users_folder(tmp_path / "mine")
    with pytest.raises(EdgetuneError, match="which edgetune did not make"):
        main(QuickstartConfig(output=str(mine)))
    assert_untouched(mine)
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    own = tmp_path / "repo" / "edgetune-quickstart"
    own.mkdir()
    (own / "quickstart.json").write_text("{}")
    (own / "run").mkdir()
    with folders.folder_lock(own, "quick start"):
        prepare_output(own, QuickstartConfig(output=str(own)))
    assert sorted(p.name for p in own.iterdir()) == [".gitignore", "quickstart.json"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=own.parent, capture_output=True,
                            text=True, check=True)
    assert status.stdout == ""  # the folder ignores itself


HOLD = """
import sys, time
from pathlib import Path
from edgetune import folders
with folders.folder_lock(Path(sys.argv[1]), "run folder", verb="edgetune train"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_locked_run_folder_names_its_holder(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    assert train(config(tiny_model, alpaca_file, run, steps=2)).steps == 2
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["train", "--resume", "--output", str(run)], ["export", str(run), "--gguf", "f16"]):
            result = edgetune(*args)
            assert result.returncode == 1
            assert result.stderr.strip().splitlines()[-1] == (
                f"edgetune: run folder {run} is in use by PID {holder.pid} (edgetune train): "
                "wait for it to finish or stop it first")
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: its file is left, and blocks nothing
    assert (run / folders.LOCK_FILE).exists()
    result = edgetune("train", "--resume", "--output", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert not (run / folders.LOCK_FILE).exists()


def test_two_processes_on_one_folder(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    procs = [edgetune(*train_args(tiny_model, alpaca_file, run, "--steps", "150", "--seed", str(seed)),
                      wait=False) for seed in (0, 1)]
    outputs = [p.communicate() for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outputs
    winner = 0 if procs[0].returncode == 0 else 1
    loser_error = outputs[1 - winner][1].strip().splitlines()[-1]
    assert (f"is in use by PID {procs[winner].pid} (edgetune train)" in loser_error
            or "holds a run: pass --force" in loser_error), loser_error
    import yaml

    assert yaml.safe_load((run / "edgetune_run.yaml").read_text())["seed"] == winner
    steps = [line for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == 150


def test_leftovers_of_a_killed_process_are_removed_at_the_next_start(tiny_model, alpaca_file,
                                                                       tmp_path):
    run = tmp_path / "run"
    assert train(config(tiny_model, alpaca_file, run, steps=4)).steps == 4
    dead = _dead_pid()
    made = [run / "checkpoints" / f".step-000006.tmp-{dead}", run / f".adapter.tmp-{dead}",
            run / "checkpoints" / f".step-000002.del-{dead}", run / f".tokenizer.old-{dead}"]
    for path in made:
        path.mkdir()
        (path / "state.json").write_text("{}")
    (run / f".train_log.jsonl.tmp-{dead}").write_text("")
    train(TrainConfig(output=str(run), resume=True, progress=False))
    left = [p.name for p in run.rglob("*") if folders.LEFTOVER.search(p.name)]
    assert left == []


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_sigterm_checkpoints_and_exits_143(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    child = edgetune(*train_args(tiny_model, alpaca_file, run, "--steps", "400", "--save-every", "1000"),
                     wait=False)
    log = run / "train_log.jsonl"
    while child.poll() is None and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.01)
    child.send_signal(15)
    out, err = child.communicate()
    assert child.returncode == 143, err
    steps = len(log.read_text().splitlines())
    assert steps >= 3 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"edgetune: interrupted at step {steps}; checkpoint written. "
                                            f"Continue with: edgetune train --resume --output {run}")
    assert "interrupted" not in out
    from edgetune.train import checkpoint

    assert checkpoint.step_of(checkpoint.completed(run)[-1]) == steps


def test_validation_comes_before_the_model_and_writes_nothing(tiny_model, alpaca_file, tmp_path,
                                                               monkeypatch, capsys):
    from edgetune.train import model as model_lib

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before validation finished")

    monkeypatch.setattr(model_lib, "load_base", no_model)
    base = train_args(tiny_model, alpaca_file, tmp_path / "run")
    cases = {"--ram abc": "--ram abc: cannot read size", "--threads 0": "--threads must be at least 1",
             "--save-every -1": "--save-every must be 0 or more",
             "--dropout 1.5": "--dropout must be in [0, 1)", "--target-modules ,": "names no module",
             "--eval-data missing.jsonl": "data file missing.jsonl does not exist"}
    for flags, message in cases.items():
        assert cli.main(base + flags.split()) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_an_interrupted_quickstart_says_so_in_its_results(tiny_model, tmp_path, monkeypatch):
    import json

    import edgetune.train.command
    from edgetune.quickstart import QuickstartConfig, main
    from edgetune.train.loop import Summary

    stopped = Summary(steps=3, train_loss=1.0, eval_loss=None, tokens_per_s=1.0, peak_rss_bytes=0,
                      interrupted=True, exit_status=143)
    monkeypatch.setattr(edgetune.train.command, "train", lambda config: stopped)
    out = tmp_path / "edgetune-quickstart"
    assert main(QuickstartConfig(output=str(out), model=str(tiny_model))) == 143
    result = json.loads((out / "quickstart.json").read_text())
    assert (result["status"], result["steps"]) == ("interrupted", 3)
