import json

import pytest
import torch
from conftest import reference_loss

from edgetune.errors import EdgetuneError
from edgetune.methods import NAMES
from edgetune.train import checkpoint
from edgetune.train.command import train
from edgetune.train.config import TrainConfig
from edgetune.train.loss import causal_lm_loss


def config(tiny_model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model), data=str(data), output=str(out), dtype="fp32",
                    steps=6, batch_size=4, seq_len=64, lr=1e-2, rank=8, eval_every=3, save_every=2,
                    progress=False, seed=0)
    return TrainConfig(**{**settings, **overrides})


def test_lora_parameter_count(tiny_model):
    from edgetune.train.model import add_lora, load_base, parameter_counts

    model = add_lora(load_base(tiny_model, torch.float32, "cpu"), 8, 16, 0.0, "all-linear", 0, False)
    trainable, _ = parameter_counts(model)
    # per layer, rank 8 x (in + out): q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64
    assert trainable == 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)


def test_chunked_loss_equals_full_logits_loss(tiny_model, alpaca_file):
    from transformers import AutoTokenizer

    from edgetune.records import read_jsonl
    from edgetune.train.data import Batches, encode
    from edgetune.train.model import add_lora, load_base

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fmt, records = read_jsonl(alpaca_file)
    batch = Batches(encode(tokenizer, fmt, records), 8, 0, tokenizer.pad_token_id).next()
    model = add_lora(load_base(tiny_model, torch.float32, "cpu"), 8, 16, 0.0, "all-linear", 0, False)
    for p in model.parameters():  # non-zero lora_B so the adapter changes the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    grads = []
    for loss_fn in (causal_lm_loss, reference_loss):
        loss, n = loss_fn(model, batch)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
        grads[-1].append(loss.detach())
    for mine, reference in zip(*grads):
        # F.cross_entropy's backward sums in another order: gradients of ~1e-3 differ by ~1e-6.
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=2e-6)


def test_run_folder_is_a_peft_adapter(tiny_model, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = train(config(tiny_model, alpaca_file, tmp_path / "run"))
    assert summary.steps == 6 and summary.eval_loss is not None
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [r["step"] for r in log if "eval_loss" in r] == [3, 6]
    assert log[-1]["loss"] < log[0]["loss"]
    assert [p.name for p in checkpoint.completed(tmp_path / "run")] == ["step-000004", "step-000006"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, tmp_path / "run")
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 32.0


@pytest.mark.parametrize("method,steps,cut", [(m, 8, 5) for m in NAMES] + [("adalora", 10, 9)])
def test_interrupted_and_resumed_run_matches_uninterrupted(method, steps, cut, tiny_model, alpaca_file,
                                                           tmp_path):
    """Every method resumes exactly. AdaLoRA is cut inside its pruning phase (its allocator's scores
    must come back) and after its final allocation (its rank pattern must come back)."""
    settings = dict(steps=steps, save_every=3, method=method)
    whole = train(config(tiny_model, alpaca_file, tmp_path / "whole", **settings))

    def interrupt(step: int) -> None:
        if step == cut:
            raise KeyboardInterrupt

    cut_run = train(config(tiny_model, alpaca_file, tmp_path / "cut", **settings), interrupt)
    assert cut_run.interrupted and cut_run.steps == cut
    assert checkpoint.completed(tmp_path / "cut")[-1].name == f"step-{cut:06d}"
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = train(TrainConfig(output=str(tmp_path / "cut"), resume=True, progress=False))
    assert resumed.steps == steps
    assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-5)
    assert resumed.eval_loss == pytest.approx(whole.eval_loss, abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_existing_output_needs_force(tiny_model, alpaca_file, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(EdgetuneError, match="holds keep.txt, which edgetune did not make"):
        train(config(tiny_model, alpaca_file, tmp_path / "run"))
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_bad_data_leaves_no_run_folder(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(EdgetuneError, match="bad.jsonl:2"):
        train(config(tiny_model, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(EdgetuneError, match="not an edgetune run"):
        train(TrainConfig(output=str(tmp_path / "none"), resume=True))


def test_checkpoint_write_is_atomic(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one as the newest whole checkpoint."""
    from edgetune.train import statefile

    run = tmp_path / "run"
    original, calls = statefile.save, []

    def crash_on_second(folder, state):
        calls.append(folder)
        original(folder, state)
        if len(calls) == 2:
            raise RuntimeError("a bug in the middle of a checkpoint write")

    monkeypatch.setattr(statefile, "save", crash_on_second)
    with pytest.raises(RuntimeError, match="a bug"):
        train(config(tiny_model, alpaca_file, run, steps=4, save_every=2))
    assert [p.name for p in checkpoint.completed(run)] == ["step-000002"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # no temporary left
    assert not (run / "adapter_model.safetensors").exists()


def test_memory_guard_stops_with_a_checkpoint(tiny_model, alpaca_file, tmp_path):
    from edgetune.train.heap import rss

    budget = f"{rss() // 2**20 - 1}mb"  # already passed: the run's peak starts at the process's RSS
    summary = train(config(tiny_model, alpaca_file, tmp_path / "run", ram=budget))
    assert summary.stopped_for_memory and summary.steps == 1
    assert checkpoint.completed(tmp_path / "run")[-1].name == "step-000001"


def test_plan_auto_picks_settings_that_fit(tiny_model, alpaca_file, tmp_path, capsys):
    import yaml

    summary = train(config(tiny_model, alpaca_file, tmp_path / "run", plan="auto", ram="4gb",
                           rank=8, steps=2))
    assert summary.steps == 2
    assert "--plan auto for --ram 4gb" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "edgetune_run.yaml").read_text())
    assert saved["plan"] is None and saved["rank"] == 64  # the planner prefers the highest rank


def test_plan_auto_refuses_an_impossible_budget(tiny_model, alpaca_file, tmp_path):
    with pytest.raises(EdgetuneError, match="--ram 100mb is less than the trainer's runtime alone"):
        train(config(tiny_model, alpaca_file, tmp_path / "run", plan="auto", ram="100mb"))
    assert not (tmp_path / "run").exists()


def test_a_run_measures_its_own_peak_not_the_process_s_earlier_one(tiny_model, alpaca_file, tmp_path):
    """A run inside a process that peaked earlier (a notebook, a test session) is judged on its own
    peak: --ram below that earlier peak but above the run's needs does not stop it."""
    import numpy as np

    from edgetune.train.heap import peak_rss, rss

    earlier = np.ones(2**28, dtype=np.uint8)  # 256 MiB touched, then freed: the process's peak
    del earlier
    assert peak_rss() - rss() > 200 * 2**20
    budget = f"{(rss() + 150 * 2**20) // 2**20}mb"
    summary = train(config(tiny_model, alpaca_file, tmp_path / "run", ram=budget, steps=2))
    assert not summary.stopped_for_memory and summary.steps == 2
