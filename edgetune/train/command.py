"""`edgetune train`: load, tokenize, train with LoRA/QLoRA, and leave a PEFT adapter in the run folder."""

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from edgetune import models, templates
from edgetune.config import as_dict
from edgetune.errors import EdgetuneError
from edgetune.records import read_jsonl
from edgetune.runfiles import CHAT_TEMPLATE, RUN_CONFIG, TOKENIZER
from edgetune.train.config import TrainConfig
from edgetune.train.data import Batches, encode, fit_to_length, split
from edgetune.units import parse_size

# Settings a resumed run may change; everything else is taken from the run it continues.
RESUMABLE = {"resume", "force", "progress", "threads", "ram", "save_every", "keep_checkpoints",
             "cache_dir", "output"}


def main(config: TrainConfig) -> int:
    summary = train(config)
    if summary.interrupted:
        print(f"edgetune: interrupted at step {summary.steps}; checkpoint written. "
              f"Continue with: edgetune train --resume --output {config.output}")
        return 130
    if summary.stopped_for_memory:
        return 3
    return 0


def train(config: TrainConfig, on_step: Callable[[int], None] | None = None) -> Any:
    """Run `config` to completion (or interruption) and return the loop's Summary."""
    import torch

    from edgetune.train import model as model_lib
    from edgetune.train.heap import MemoryGuard, lean_heap
    from edgetune.train.loop import Loop
    from edgetune.train.optim import cosine_schedule, make_optimizer

    run_dir = Path(config.output)
    config = _check_run_dir(config, run_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    records = read_records(config)  # cheap checks first: a bad file fails before any model loads
    if config.template and not config.resume:
        templates.resolve(config.template)
    device = model_lib.pick_device(config.device)
    dtype = model_lib.pick_dtype(config.dtype, device)
    model_dir = models.resolve(config.model, config.cache_dir)
    models.check_trainable(model_dir)
    if config.plan == "auto":
        config = apply_plan(config, model_dir, device, dtype)
    tokenizer = _tokenizer(model_dir)
    config, template = _chat_template(config, tokenizer, records, run_dir)
    train_set, eval_set = load_examples(config, tokenizer, records)
    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * config.grad_accum))
    total = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))

    base = model_lib.load_base(model_dir, dtype, device, config.quant, config.double_quant)
    model = model_lib.add_lora(base, config.rank, config.alpha, config.dropout, config.modules,
                               config.seed, config.grad_checkpointing)
    _prepare_run_dir(config, run_dir)  # only now, with everything read and loaded, is a folder made
    if template and not config.resume:
        _write_atomic(run_dir / CHAT_TEMPLATE, template)
    trainable, params = model_lib.parameter_counts(model)
    print(f"edgetune: {config.model}: {params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
          f"(LoRA rank {config.rank}); {len(train_set)} train / {len(eval_set)} eval examples; "
          f"{total} steps on {device} in {str(dtype).removeprefix('torch.')}")
    optimizer = make_optimizer(config.optim, [p for p in model.parameters() if p.requires_grad],
                               config.lr, config.weight_decay, device)
    scheduler = cosine_schedule(optimizer, int(config.warmup * total), total)
    batches = Batches(train_set, config.batch_size, config.seed, _pad_id(tokenizer))
    guard = MemoryGuard(parse_size(config.ram)) if config.ram else None
    loop = Loop(model, optimizer, scheduler, batches, eval_set, run_dir, config, total, guard)
    if config.resume:
        from edgetune.train.checkpoint import completed

        loop.restore(completed(run_dir)[-1])
        print(f"edgetune: resuming {run_dir} at step {loop.step} of {total}")
    with lean_heap(config.grad_checkpointing) as release:  # the memory-first setting: see lean_heap
        summary = loop.run(on_step, after_step=release)
    if summary.stopped_for_memory:
        print(f"edgetune: stopped at step {summary.steps} to stay inside --ram {config.ram}: "
              f"{guard.message}; checkpoint written. {_suggestion(config, model_dir, dtype)}")
    elif not summary.interrupted:
        from edgetune.train.checkpoint import save_adapter
        from edgetune.train.curves import update

        save_adapter(run_dir, model)
        tokenizer.save_pretrained(run_dir / TOKENIZER)
        update(run_dir, title=config.output)
        _report(summary, run_dir)
    return summary


def _check_run_dir(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """Refuse to overwrite a run by accident; on --resume, continue the run's own settings."""
    if config.resume:
        saved_file = run_dir / RUN_CONFIG
        if not saved_file.is_file():
            raise EdgetuneError(f"--resume: {run_dir} is not an edgetune run (no {RUN_CONFIG})")
        from edgetune.train.checkpoint import completed

        if not completed(run_dir):
            raise EdgetuneError(f"--resume: {run_dir} has no checkpoint to continue from")
        saved = yaml.safe_load(saved_file.read_text())
        given = {k: v for k, v in dataclasses.asdict(config).items() if k in RESUMABLE}
        return TrainConfig(**{**saved, **given})
    if run_dir.exists() and not config.force:
        raise EdgetuneError(f"output folder {run_dir} exists: pass --force to replace it "
                            "or --resume to continue it")
    return config


def _prepare_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Only now, with the data checked, is an old run replaced."""
    if config.resume:
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    tmp = run_dir / f".{RUN_CONFIG}.tmp"
    tmp.write_text(yaml.safe_dump(as_dict(config), sort_keys=False))
    os.replace(tmp, run_dir / RUN_CONFIG)


def _chat_template(config: TrainConfig, tokenizer: Any, records: dict,
                   run_dir: Path) -> tuple[TrainConfig, str | None]:
    """Put the run's chat template on the tokenizer: --template, else the model's own, else (a base
    model with chat or alpaca records) a default, recorded in the run config by name."""
    if config.resume:
        saved = run_dir / CHAT_TEMPLATE
        text = saved.read_text(encoding="utf-8") if saved.is_file() else None
    else:
        needs_one = any(fmt != "text" for fmt, _ in records.values())
        name, text = templates.choose(config.template, tokenizer.chat_template,
                                      tokenizer.get_vocab(), needs_one, config.model)
        if name is not None and config.template is None:
            config = dataclasses.replace(config, template=name)
    if text is not None:
        tokenizer.chat_template = text
    return config, text


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def read_records(config: TrainConfig) -> dict:
    """{path: (format, records)} for the training and validation files."""
    paths = [config.data] + ([config.eval_data] if config.eval_data else [])
    return {path: read_jsonl(path) for path in paths}


def load_examples(config: TrainConfig, tokenizer: Any, records: dict | None = None) -> tuple:
    """Tokenized (train, eval) examples, checked and truncated to --seq-len."""
    records = records or read_records(config)

    def examples(path: str) -> list:
        fmt, rows = records[path]
        return fit_to_length(encode(tokenizer, fmt, rows), config.seq_len, path)

    if config.eval_data:
        return examples(config.data), examples(config.eval_data)
    return split(examples(config.data), config.eval_split, config.seed)


def _plan_inputs(config: TrainConfig, model_dir: Path, dtype: Any) -> tuple:
    from edgetune.shape import shape_from_model_dir

    return shape_from_model_dir(model_dir), parse_size(config.ram), str(dtype).endswith("bfloat16")


def apply_plan(config: TrainConfig, model_dir: Path, device: str, dtype: Any) -> TrainConfig:
    """--plan auto: the planner's quantization, rank, batch, checkpointing and optimizer."""
    from edgetune.plan.search import choose

    shape, budget, bf16 = _plan_inputs(config, model_dir, dtype)
    plan = choose(shape, budget, seq_len=config.seq_len, device=device,
                  target_batch=config.batch_size * config.grad_accum,
                  dtype="bf16" if bf16 else "fp32", budget_flag=f"--ram {config.ram}")
    print(f"edgetune: --plan auto for --ram {config.ram}: {plan.describe()} "
          f"(predicted peak {plan.memory.total / 2**30:.2f} GiB)")
    return dataclasses.replace(config, quant=plan.quant, rank=plan.rank, batch_size=plan.batch_size,
                               grad_accum=plan.grad_accum, optim=plan.optim,
                               grad_checkpointing=plan.grad_checkpointing, plan=None)


def _suggestion(config: TrainConfig, model_dir: Path, dtype: Any) -> str:
    from edgetune.plan.search import suggestion

    shape, budget, bf16 = _plan_inputs(config, model_dir, dtype)
    return suggestion(shape, budget, seq_len=config.seq_len,
                      target_batch=config.batch_size * config.grad_accum,
                      dtype="bf16" if bf16 else "fp32", device=config.device.replace("auto", "cpu"))


def _report(summary: Any, run_dir: Path) -> None:
    parts = [f"{summary.steps} steps", f"{summary.tokens_per_s:.0f} tokens/s",
             f"peak RSS {summary.peak_rss_bytes / 2**30:.2f} GiB"]
    if summary.train_loss is not None:
        parts.insert(1, f"train loss {summary.train_loss:.4f}")
    if summary.eval_loss is not None:
        parts.insert(2, f"eval loss {summary.eval_loss:.4f}")
    print(f"edgetune: done: {', '.join(parts)}. Adapter in {run_dir}")
