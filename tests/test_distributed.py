"""Data-parallel training: N processes through torch.distributed give the run one process makes with
N-fold gradient accumulation, and fail, refuse and resume the way one process does."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from edgetune import cli
from edgetune.runfiles import ADAPTER_WEIGHTS, TRAIN_LOG

ROOT = Path(__file__).resolve().parents[1]


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--dtype", "fp32", "--threads", "1", "--no-progress", "--seq-len", "64", "--rank", "4",
            "--batch-size", "2", "--steps", "4", "--save-every", "2", "--eval-every", "0",
            "--lr", "1e-3", *extra]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / TRAIN_LOG).read_text().splitlines()]


def _largest_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / ADAPTER_WEIGHTS), load_file(b / ADAPTER_WEIGHTS)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The same run made by 1 process with --grad-accum 2 and by 2 processes (--nproc 2)."""
    from conftest import write_jsonl

    folder = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(folder / "data.jsonl", [{"instruction": f"Repeat the number {i}.",
                                                "output": f"{i} {i}"} for i in range(40)])
    one, two = folder / "one", folder / "two"
    assert cli.main(_args(tiny_model, data, one, "--grad-accum", "2")) == 0
    assert cli.main(_args(tiny_model, data, two, "--nproc", "2")) == 0
    return data, one, two


def test_two_processes_equal_one_with_gradient_accumulation(runs):
    _, one, two = runs
    assert len(_losses(two)) == 4
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert _largest_difference(one, two) <= 1e-5
    # rank 0 alone wrote the run folder: no second log, no stray temporary folders
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_adalora_in_two_processes_equals_one(runs, tiny_model, tmp_path):
    """A method's hooks in data-parallel runs: AdaLoRA's regulariser counted once across the ranks,
    and its rank allocation made from the summed gradients, as one process makes them."""
    data, _, _ = runs
    one, two = tmp_path / "one", tmp_path / "two"
    method = ("--method", "adalora", "--init-rank", "6")
    assert cli.main(_args(tiny_model, data, one, *method, "--grad-accum", "2")) == 0
    assert cli.main(_args(tiny_model, data, two, *method, "--nproc", "2")) == 0
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert _largest_difference(one, two) <= 1e-5


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tiny_model, tmp_path, capsys):
    import shutil

    _, one, two = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    assert cli.main(["train", "--resume", "--output", str(resumed), "--nproc", "1"]) == 0
    assert "--grad-accum 1 -> 2 (1 process)" in capsys.readouterr().out
    assert _losses(resumed) == pytest.approx(_losses(one), abs=1e-5)
    assert _largest_difference(one, resumed) <= 1e-5


def test_nproc_zero_is_refused(tiny_model, alpaca_file, tmp_path, capsys):
    assert cli.main(_args(tiny_model, alpaca_file, tmp_path / "r", "--nproc", "0")) == 1
    assert capsys.readouterr().err.strip() == "edgetune: --nproc must be at least 1, got 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, args: list[str], world: int = 2) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-W", "ignore", "-m", "edgetune", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ranks_with_different_settings_are_refused_by_rank_0(tiny_model, alpaca_file, tmp_path):
    port = _free_port()
    ranks = [_rank(r, port, _args(tiny_model, alpaca_file, tmp_path / "r", "--lr", lr,
                                  "--dist-timeout", "60"))
             for r, lr in enumerate(("1e-3", "2e-3"))]
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in ranks)
    assert [p.returncode for p in ranks] == [1, 1]
    assert err0.strip().splitlines()[-1] == (
        "edgetune: rank 1 was started with --lr 0.002 and rank 0 with 0.001: every process of a run "
        "needs the same settings (only --threads and --progress may differ)")
    assert err1.strip() == ""
    assert not (tmp_path / "r").exists()


def test_an_unreachable_rendezvous_ends_in_bounded_time(tiny_model, alpaca_file, tmp_path):
    started = time.monotonic()
    rank = _rank(1, _free_port(), _args(tiny_model, alpaca_file, tmp_path / "r",
                                        "--dist-timeout", "3"))
    _, err = rank.communicate(timeout=120)
    assert rank.returncode == 1
    assert time.monotonic() - started < 60
    line = err.strip().splitlines()[-1]
    assert line.startswith("edgetune: rank 1 could not join the run at 127.0.0.1:") and (
        "within --dist-timeout 3s" in line)


def test_a_killed_rank_ends_the_run_and_leaves_the_last_checkpoint_whole(tiny_model, alpaca_file,
                                                                         tmp_path):
    import psutil

    from edgetune.train.checkpoint import completed

    out = tmp_path / "run"
    args = _args(tiny_model, alpaca_file, out, "--nproc", "2", "--steps", "400", "--save-every", "1",
                 "--dist-timeout", "600")
    launcher = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "edgetune", *args], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not completed(out) and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    assert completed(out), "no checkpoint was written"
    rank1 = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # the launcher stops the other rank; it does not wait
    assert launcher.returncode != 0
    assert err.strip().splitlines()[-1].startswith("edgetune: rank 1 of 2 was killed (SIGKILL)")
    last = completed(out)[-1]
    step = int(last.name.split("-")[1])
    assert 1 <= step < 400
    from edgetune.train import statefile

    assert statefile.load(last)["step"] == step  # whole: its state and adapter read back
    assert load_file(last / ADAPTER_WEIGHTS)


def test_qlora_ranks_stop_together_at_the_memory_budget(tiny_model, alpaca_file, tmp_path):
    """nf4 weights, 8-bit AdamW and gradient checkpointing under two ranks; a budget below what a
    process holds stops every rank after the first step, with rank 0's checkpoint."""
    from edgetune.train.checkpoint import completed

    out = tmp_path / "run"
    args = _args(tiny_model, alpaca_file, out, "--nproc", "2", "--quant", "nf4", "--optim",
                 "adamw8bit", "--grad-checkpointing", "--ram", "300mb", "--steps", "20")
    run = subprocess.run([sys.executable, "-W", "ignore", "-m", "edgetune", *args], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 3
    assert run.stdout.count("edgetune: stopped at step 1 to stay inside --ram 300mb") == 1
    assert [p.name for p in completed(out)] == ["step-000001"]
    assert len(_losses(out)) == 1


def test_resuming_with_other_process_counts_keeps_the_micro_batches_of_a_step(alpaca_file):
    from edgetune.errors import EdgetuneError
    from edgetune.train.command import per_rank_accum
    from edgetune.train.config import TrainConfig

    config = TrainConfig(data=str(alpaca_file), grad_accum=1)
    assert per_rank_accum(config, None, 4) == (config, [])
    assert per_rank_accum(config, 2, 2) == (config, [])
    four, said = per_rank_accum(config, 4, 1)
    assert four.grad_accum == 4 and said == ["--grad-accum 1 -> 4 (1 process)"]
    assert per_rank_accum(config, 4, 2)[0].grad_accum == 2
    with pytest.raises(EdgetuneError, match="each step of this run reads 4 micro-batches, which 3 "
                                            "processes cannot share equally"):
        per_rank_accum(config, 4, 3)
