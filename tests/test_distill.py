"""`edgetune distill`: the KD loss against full logits, the llama.cpp teacher pass and its cache, exact
resume, and the bad inputs, on the tiny models (a trained tiny llama in GGUF teaches a random one)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer, write_jsonl

from edgetune import cli
from edgetune.constants import IGNORE
from edgetune.distill.command import RECORD, RESPONSES
from edgetune.distill.command import main as distill_main
from edgetune.distill.config import DistillConfig
from edgetune.errors import EdgetuneError
from edgetune.records import read_jsonl
from edgetune.train.command import train
from edgetune.train.kd import distill_loss

from test_resume import adapter, interrupt_at


@pytest.fixture(scope="session")
def teacher_gguf(tiny_trained, tmp_path_factory) -> Path:
    from edgetune.export.gguf import write_gguf

    path = tmp_path_factory.mktemp("teacher") / "teacher.gguf"
    write_gguf(tiny_trained, path, "f16")
    return path


@pytest.fixture
def prompts(tmp_path) -> Path:
    """Alpaca prompts, half without an answer, and one chat ending in a user turn."""
    rows = [{"instruction": f"Repeat the number {i}."} if i % 2 else
            {"instruction": f"Repeat the number {i}.", "output": f"{i} {i}"} for i in range(11)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def settings(student, teacher, data, out, cache, **overrides) -> DistillConfig:
    values = dict(model=str(student), teacher=str(teacher), data=str(data), output=str(out),
                  cache_dir=str(cache), dtype="fp32", steps=6, batch_size=2, seq_len=48, lr=1e-2,
                  rank=4, top_k=8, max_new_tokens=6, eval_split=0.0, save_every=2, eval_every=0,
                  progress=False, threads=1)
    return DistillConfig(**{**values, **overrides})


def reference_kd(model, batch, kind: str, ce_weight: float):
    """The same loss from full logits, by autograd: what the chunked one must equal."""
    from edgetune.train.loss import _inputs

    logits = model(**_inputs(batch)).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    log_q = logits[keep].float().log_softmax(-1)
    log_p = batch["top_logprobs"].log_softmax(-1)
    ids = batch["top_ids"].long()
    if kind == "kl":
        kd = (log_p.exp() * (log_p - log_q.gather(1, ids))).sum()
    else:
        p = torch.zeros_like(log_q).scatter_(1, ids, log_p.exp())
        m = (p + log_q.exp()) / 2
        kd = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum() \
            + 0.5 * (log_q.exp() * (log_q - m.log())).sum()
    ce = -log_q.gather(1, targets[keep][:, None]).sum()
    return kd + ce_weight * ce


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_kd_loss_and_gradient_equal_full_logits(kind, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.randint(3, 290, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    n = int((labels[:, 1:] != IGNORE).sum())
    gen = torch.Generator().manual_seed(1)
    top = torch.stack([torch.randperm(model.config.vocab_size, generator=gen)[:6] for _ in range(n)])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "top_ids": top.int(), "top_logprobs": torch.randn(n, 6, generator=gen) - 3}
    got, count = distill_loss(model, batch, kind, 0.3)
    got.backward()
    chunked = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = reference_kd(model, batch, kind, 0.3)
    want.backward()
    assert count == n and got.item() == pytest.approx(want.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if name in chunked:
            torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6)


def test_distill_logits_end_to_end_and_cached(tiny_model, teacher_gguf, prompts, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert distill_main(settings(tiny_model, teacher_gguf, prompts, tmp_path / "a", cache)) == 0
    out = capsys.readouterr().out
    assert "teacher pass:" in out and "tokens/s) on llama.cpp" in out
    run = tmp_path / "a"
    assert (run / "adapter_model.safetensors").is_file()
    record = json.loads((run / RECORD).read_text())
    assert record["mode"] == "logits" and record["top_k"] == 8 and record["loss"] == "kl"
    entry = Path(record["teacher_pass"]["entry"])
    assert record["teacher_pass"]["tokens"] > 0 and record["teacher_pass"]["tokens_per_s"] > 0
    fmt, rows = read_jsonl(run / RESPONSES)  # what `edgetune train` takes as is
    assert fmt == "alpaca" and len(rows) == 11 and all("output" in r for r in rows)
    assert rows[0]["output"] == "0 0"  # an answer given in the data is kept
    arrays = np.load(entry)
    assert arrays["ids"].shape[1] == 8 and arrays["counts"].sum() == arrays["ids"].shape[0]
    assert np.all(np.diff(arrays["logprobs"], axis=1) <= 0) and np.all(arrays["logprobs"] <= 0)
    # a second run reuses both passes; another k makes another entry
    assert distill_main(settings(tiny_model, teacher_gguf, prompts, tmp_path / "b", cache)) == 0
    out = capsys.readouterr().out
    assert "top-8 comes from the cache" in out and "responses to" in out and "teacher pass" not in out
    assert adapter(tmp_path / "a") == adapter(tmp_path / "b")
    assert distill_main(settings(tiny_model, teacher_gguf, prompts, tmp_path / "c", cache,
                                 top_k=4)) == 0
    assert "teacher pass:" in capsys.readouterr().out and entry.is_file()


def test_corrupted_cache_is_said_and_rebuilt(tiny_model, teacher_gguf, prompts, tmp_path, capsys):
    cache = tmp_path / "cache"
    distill_main(settings(tiny_model, teacher_gguf, prompts, tmp_path / "a", cache, steps=2))
    entry = Path(json.loads((tmp_path / "a" / RECORD).read_text())["teacher_pass"]["entry"])
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    capsys.readouterr()
    distill_main(settings(tiny_model, teacher_gguf, prompts, tmp_path / "b", cache, steps=2))
    out = capsys.readouterr().out
    assert f"teacher cache {entry} is corrupted (checksum mismatch): rebuilding it" in out
    assert "teacher pass:" in out
    assert adapter(tmp_path / "a") == adapter(tmp_path / "b")
    assert not [p for p in entry.parent.iterdir() if ".tmp-" in p.name]


def test_distill_resumes_exactly(tiny_model, teacher_gguf, prompts, tmp_path):
    from edgetune.distill.command import Distill

    cache, kd_loss = tmp_path / "cache", "jsd"  # KL runs end to end above
    whole = settings(tiny_model, teacher_gguf, prompts, tmp_path / "whole", cache, kd_loss=kd_loss)
    assert train(whole, task=Distill()).steps == 6
    cut = settings(tiny_model, teacher_gguf, prompts, tmp_path / "cut", cache, kd_loss=kd_loss)
    assert train(cut, interrupt_at(3), task=Distill()).interrupted
    resumed = DistillConfig(output=str(tmp_path / "cut"), resume=True, progress=False)
    assert distill_main(resumed) == 0
    assert adapter(tmp_path / "cut") == adapter(tmp_path / "whole")


def test_sequences_mode_trains_on_the_teachers_responses(tiny_model, teacher_gguf, prompts,
                                                         tmp_path):
    run = tmp_path / "seq"
    config = settings(tiny_model, teacher_gguf, prompts, run, tmp_path / "cache", mode="sequences",
                      temperature=0.7, top_p=0.9)
    assert distill_main(config) == 0
    record = json.loads((run / RECORD).read_text())
    assert record["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 6, "seed": 0}
    assert "teacher_pass" not in record and record["mode"] == "sequences"
    # the responses are data `edgetune train` takes as is
    assert cli.main(["train", "--model", str(tiny_model), "--data", str(run / RESPONSES),
                     "--output", str(tmp_path / "plain"), "--steps", "1", "--seq-len", "48",
                     "--no-progress", "--threads", "1", "--dtype", "fp32"]) == 0


def student_with_another_vocab(tiny_model, out: Path) -> Path:
    shutil.copytree(tiny_model, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    build_tokenizer(out, vocab_size=280)
    return out


def test_bad_input_is_one_line(tiny_model, teacher_gguf, prompts, tmp_path, capsys):
    def fails(*flags) -> str:
        argv = ["distill", "--teacher", str(teacher_gguf), "--data", str(prompts), "--student",
                str(tiny_model), "--output", str(tmp_path / "run"), "--cache-dir",
                str(tmp_path / "cache"), "--no-progress", "--seq-len", "48", "--steps", "1", *flags]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("edgetune: ")
        return err

    other = student_with_another_vocab(tiny_model, tmp_path / "other")
    assert "do not share a tokenizer (300 tokens in the teacher, 280 in the student)" in \
        fails("--student", str(other))
    assert "--top-k must be at least 1, got 0" in fails("--top-k", "0")
    assert "--top-k 5000 is larger than the teacher's vocabulary (300 tokens)" in \
        fails("--top-k", "5000")
    assert "record 1: its prompt is" in fails("--seq-len", "8")
    assert "a folder: the teacher runs in llama.cpp" in fails("--teacher", str(tiny_model))
    assert "needs about 66.2 MiB in llama.cpp, more than --ram 32mb" in fails("--ram", "32mb")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_prompt_records_are_accepted_only_for_distill(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Say hi."},
                                             {"messages": [{"role": "user", "content": "Hi"}]}][:1])
    assert read_jsonl(data, prompts=True)[1] == [{"instruction": "Say hi."}]
    with pytest.raises(EdgetuneError, match="needs a string 'output' field"):
        read_jsonl(data)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert read_jsonl(chat, prompts=True)[0] == "chat"
    system = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "system", "content": "x"}]}])
    with pytest.raises(EdgetuneError, match="does not end in a user turn"):
        read_jsonl(system, prompts=True)


def test_teacher_memory_terms(teacher_gguf):
    from edgetune.plan.teacher import teacher_memory
    from edgetune.shape import shape_from_gguf

    memory = teacher_memory(shape_from_gguf(teacher_gguf), 1000, ctx=54)
    assert memory.weights == 1000
    assert memory.kv_cache == 2 * 2 * 32 * 2 * 54  # K and V, 2 layers, 2 heads of 16, f16
    assert memory.logits == 54 * 300 * 4  # every position's fp32 logits over 300 tokens
    assert memory.overhead == 64 * 2**20 + 512 * (300 + 4 * 64 + 2 * 128) * 4
    assert memory.total == 1000 + 13824 + 64800 + memory.overhead
