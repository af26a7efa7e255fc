"""The two sides of benchmarks/train_speed.py, each run in its own process: edgetune's trainer and
transformers.Trainer + PEFT on the same examples in the same order."""

import resource
import time


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _between(marks: list) -> list:
    return [b - a for a, b in zip(marks, marks[1:])]


def child_edgetune(spec: dict) -> dict:
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    s = spec["settings"]
    faults, cpu = [], []

    def mark(step: int) -> None:
        faults.append(_faults())
        cpu.append(time.process_time())

    summary = train(TrainConfig(
        model=spec["model"], data=spec["train_file"], eval_data=spec["eval_file"],
        output=spec["out"], force=True, steps=s["steps"], batch_size=s["batch"],
        seq_len=s["seq_len"], rank=s["rank"], alpha=s["alpha"], lr=s["lr"], warmup=0.0,
        dtype="fp32", eval_every=s["steps"], save_every=0, progress=False, seed=s["seed"],
        threads=s["threads"], template=spec["template"]), on_step=mark)
    # Marks are taken as each step starts, so the last step has none (its span would include the
    # final eval): CPU time covers all steps but the last, page faults are reported as medians.
    seconds = [n / r["tokens_per_s"] for n, r in zip(spec["step_counts"], summary.history)]
    return {"seconds": seconds, "eval_loss": summary.eval_loss, "faults": _between(faults),
            "cpu_seconds": _between(cpu)}


def child_transformers(spec: dict) -> dict:
    """The tutorial path: from_pretrained, get_peft_model, Trainer(use_cpu=True)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    s = spec["settings"]
    torch.set_num_threads(s["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    torch.manual_seed(s["seed"])
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in spec["train_rows"]]

    def collate(batch: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda seq, v: list(seq) + [v] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], spec["pad_id"]) for r in batch]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch])}

    class InOrder(Trainer):  # the rows are already in edgetune's order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        seconds: list = []
        faults: list = []
        cpu_seconds: list = []

        def on_step_begin(self, *args, **kwargs):
            self.started, self.first_fault = time.perf_counter(), _faults()
            self.cpu_started = time.process_time()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)
            self.faults.append(_faults() - self.first_fault)
            self.cpu_seconds.append(time.process_time() - self.cpu_started)

    args = TrainingArguments(
        output_dir=spec["out"], use_cpu=True, per_device_train_batch_size=s["batch"],
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, seed=s["seed"],
        dataloader_num_workers=0, disable_tqdm=True)
    timer = Timer()
    InOrder(model=model, args=args, train_dataset=rows, data_collator=collate,
            callbacks=[timer]).train()
    return {"seconds": timer.seconds, "faults": timer.faults, "cpu_seconds": timer.cpu_seconds,
            "eval_loss": _plain_eval_loss(model, spec["eval_rows"])}


def _plain_eval_loss(model, rows: list) -> float:
    """Mean token loss over held-out rows, one at a time (full logits, F.cross_entropy)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count
