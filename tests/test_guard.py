"""The memory guard and the planner agree: one plan for one question, and stops only past the budget."""

import json
import re

import pytest
import yaml
from conftest import write_jsonl

from edgetune.cli import main
from edgetune.train import heap
from edgetune.train.command import train
from edgetune.train.config import TrainConfig

GiB = 2**30


def guard_over(monkeypatch, peaks: list[float], budget: float = 4.0, **kwargs) -> list[str]:
    """The guard's verdict after each step whose peak RSS (GiB) is given: '' to go on, else why."""
    readings = iter(peaks)
    monkeypatch.setattr(heap, "peak_rss", lambda: int(next(readings) * GiB))
    guard = heap.MemoryGuard(int(budget * GiB), **kwargs)
    return [guard.message if guard.should_stop() else "" for _ in peaks]


def test_the_working_set_of_the_first_steps_is_not_projected(monkeypatch):
    """A run that builds 3 GiB in its first step and settles under the budget is never stopped
    (the old guard stopped it: peak + the first step's growth passed the budget)."""
    assert guard_over(monkeypatch, [3.0, 3.6, 3.62, 3.62, 3.62]) == [""] * 5


def test_a_peak_past_the_budget_stops_at_once(monkeypatch):
    verdicts = guard_over(monkeypatch, [3.0, 4.1])
    assert verdicts[0] == "" and verdicts[1] == "peak memory 4.10 GiB passed the --ram budget 4.00 GiB"


def test_memory_that_keeps_growing_stops_a_step_early(monkeypatch):
    verdicts = guard_over(monkeypatch, [3.0, 3.2, 3.5, 3.8])
    assert verdicts[:3] == ["", "", ""]
    assert verdicts[3].startswith("peak memory 3.80 GiB still grows by up to 0.30 GiB a step")


def tiny_config(tiny_model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model), data=str(data), output=str(out), dtype="fp32", steps=2,
                    seq_len=64, progress=False, eval_every=0, save_every=0, eval_split=0.0)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture
def text_file(tmp_path):
    return write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox " * 20}] * 12)


def test_plan_and_train_plan_auto_answer_the_same_question(tiny_model, text_file, tmp_path, capsys):
    """`edgetune plan` and `edgetune train --plan auto` with the same model, budget and seq-len, both
    on their defaults otherwise, choose the same settings; train prints the plan command it matches."""
    train(tiny_config(tiny_model, text_file, tmp_path / "run", plan="auto", ram="2gb"))
    printed = capsys.readouterr().out
    command = printed.split("the same question as `")[1].split("`")[0].split()
    assert command[:2] == ["edgetune", "plan"]
    assert main([*command[1:], "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["plan"]
    assert main(["plan", "--model", str(tiny_model), "--ram", "2gb", "--seq-len", "64", "--dtype",
                 "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == planned
    ran = yaml.safe_load((tmp_path / "run" / "edgetune_run.yaml").read_text())
    for key in ("quant", "rank", "batch_size", "grad_accum", "grad_checkpointing", "optim", "seq_len"):
        assert ran[key] == planned[key], key


def test_a_stop_says_measured_against_predicted_and_suggests_other_settings(tiny_model, text_file,
                                                                            tmp_path, capsys):
    from edgetune.train.heap import rss

    budget = f"{rss() // 2**20 - 1}mb"  # already passed: the run's peak starts at the process's RSS
    summary = train(tiny_config(tiny_model, text_file, tmp_path / "run", ram=budget, steps=4))
    assert summary.stopped_for_memory and summary.steps == 1
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"edgetune: stopped at step 1 to stay inside --ram {budget}: peak memory ")
    assert "passed the --ram budget" in line
    # The test process's RSS is in the run's peak: the ratio may fall on either side of 1.
    assert re.search(r"The planner predicted [\d.]+ \w+ for these settings; measured [\d.]+ \w+ "
                     r"\([\d.]+x\); with predictions( scaled by [\d.]+)?, ", line)
