"""`edgetune train`: load, tokenize, train with LoRA/QLoRA, and leave a PEFT adapter in the run folder."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from edgetune import folders, models, templates
from edgetune.errors import EdgetuneError
from edgetune.folders import RUN_MARKERS, say
from edgetune.methods import method
from edgetune.records import read_jsonl
from edgetune.runfiles import CHAT_TEMPLATE, RUN_CONFIG
from edgetune.signals import stop_on_signals
from edgetune.train.config import TrainConfig
from edgetune.train.data import encode, fit_to_length, split
from edgetune.train.resume import recorded_settings, resumed_config, truncate_log
from edgetune.units import parse_size


def main(config: TrainConfig, task: "Supervised | None" = None) -> int:
    summary = train(config, task=task)
    if summary.interrupted:
        say(f"interrupted at step {summary.steps}; checkpoint written. "
            f"Continue with: edgetune {(task or Supervised()).verb} --resume --output {config.output}")
        return summary.exit_status
    if summary.stopped_for_memory:
        return 3
    return 0


@dataclass
class Setup:
    """Everything a run needs that can be checked before a model loads or a file is written."""

    config: TrainConfig
    model_dir: Path
    device: str
    dtype: Any
    tokenizer: Any
    train_set: list
    eval_set: list
    total: int
    template: str | None  # the chat template the run trains with, when it is not the model's own
    task: "Supervised"


class Supervised:
    """What a run learns from: its records, its examples and its loss.

    `edgetune train` learns the records' responses by cross-entropy; `edgetune distill` swaps in a
    task whose examples carry a teacher's top-k and whose loss is a distillation loss, and so trains
    through this same loop.
    """

    verb = "train"  # the command that runs it, for the resume hint

    def read_records(self, config: TrainConfig) -> dict:
        return read_records(config)

    def examples(self, config: TrainConfig, tokenizer: Any, records: dict, model_dir: Path) -> tuple:
        return load_examples(config, tokenizer, records)

    def objective(self, config: TrainConfig) -> Callable:
        from edgetune.train.loss import causal_lm_loss

        return causal_lm_loss


def train(config: TrainConfig, on_step: Callable[[int], None] | None = None,
          task: Supervised | None = None) -> Any:
    """Run `config` to completion (or interruption) and return the loop's Summary.

    Every setting and file is checked before anything is written or a model loads. The run folder is
    locked while the run lasts; SIGINT and SIGTERM end it with a checkpoint (see signals.py).
    """
    with stop_on_signals():
        run_dir = Path(config.output).expanduser()
        task = task or Supervised()
        if config.resume:
            return _resume(config, run_dir, on_step, task)
        return _fresh(config, run_dir, on_step, task)


def _lock(run_dir: Path):
    return folders.folder_lock(run_dir, f"run folder {run_dir}", verb="edgetune train")


def _check_output(config: TrainConfig, run_dir: Path) -> None:
    """Refuse a folder edgetune did not make, and a run that would be replaced without --force."""
    if folders.inspect_output(run_dir, RUN_MARKERS) == "ours" and not config.force:
        raise EdgetuneError(f"output folder {run_dir} holds a run: pass --force to replace it "
                            "or --resume to continue it")


def _fresh(config: TrainConfig, run_dir: Path, on_step: Callable | None, task: Supervised) -> Any:
    _check_output(config, run_dir)
    setup = prepare(config, run_dir, task)  # a bad flag, file or model fails here, before any write
    model = load_model(setup)  # only now, with everything read and loaded, is a folder made
    with folders.disk_errors(run_dir.parent):
        run_dir.mkdir(parents=True, exist_ok=True)
    with _lock(run_dir):
        _check_output(config, run_dir)  # again, now that no other process can be writing it
        with folders.disk_errors(run_dir):
            folders.clear(run_dir)
        text = yaml.safe_dump(recorded_settings(setup.config), sort_keys=False)
        folders.write_text_atomic(run_dir / RUN_CONFIG, text)
        if setup.template is not None:
            folders.write_text_atomic(run_dir / CHAT_TEMPLATE, setup.template)
        return _run(setup, model, run_dir, None, on_step)


def _resume(config: TrainConfig, run_dir: Path, on_step: Callable | None, task: Supervised) -> Any:
    from edgetune.train.checkpoint import completed, step_of

    if not (run_dir / RUN_CONFIG).is_file():
        raise EdgetuneError(f"--resume: {run_dir} is not an edgetune run (no {RUN_CONFIG})")
    with _lock(run_dir):
        config, changes = resumed_config(config, run_dir)
        setup = prepare(config, run_dir, task)
        model = load_model(setup)
        for folder in (run_dir, run_dir / "checkpoints"):  # what an interrupted process left
            folders.remove_leftovers(folder)
        start = (completed(run_dir) or [None])[-1]
        step = step_of(start) if start else 0
        truncate_log(run_dir, step)
        changed = f"; changed: {', '.join(changes)}" if changes else ""
        if start is None:
            print(f"edgetune: {run_dir} has no checkpoint yet: starting it again from step 0 with its "
                  f"recorded settings{changed}")
        else:
            print(f"edgetune: resuming {run_dir} at step {step} of {setup.total} with its recorded "
                  f"settings{changed}")
        return _run(setup, model, run_dir, start, on_step)


def prepare(config: TrainConfig, run_dir: Path, task: Supervised | None = None) -> Setup:
    """Check the data, device and model and tokenize; loads no weights and writes no run file."""
    import torch

    from edgetune.train import model as model_lib

    if config.threads:
        torch.set_num_threads(config.threads)
    task = task or Supervised()
    records = task.read_records(config)  # cheap checks first: a bad file fails before the model resolves
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
    train_set, eval_set = task.examples(config, tokenizer, records, model_dir)
    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * config.grad_accum))
    total = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    model_lib.check_targets(model_dir, config.modules, method(config.method).name)
    return Setup(config, model_dir, device, dtype, tokenizer, train_set, eval_set, total, template,
                 task)


def load_model(setup: Setup) -> Any:
    """The base model with the method's fresh adapter (a resumed run loads its checkpoint into it)."""
    from edgetune.train import adapters
    from edgetune.train import model as model_lib

    config = setup.config
    chosen = method(config.method)
    base = model_lib.load_base(setup.model_dir, setup.dtype, setup.device, config.quant,
                               config.double_quant)
    return model_lib.add_adapter(base, adapters.peft_config(config, setup.total), config.seed,
                                 config.grad_checkpointing, fuse=chosen.fused, method_name=chosen.name)


def _run(setup: Setup, model: Any, run_dir: Path, start: Path | None,
         on_step: Callable | None) -> Any:
    """Train (from checkpoint `start`, if any) and write the adapter."""
    from edgetune.train import adapters
    from edgetune.train import model as model_lib
    from edgetune.train.checkpoint import save_adapter
    from edgetune.train.curves import update
    from edgetune.train.data import Batches
    from edgetune.train.heap import MemoryGuard, lean_heap
    from edgetune.train.loop import Loop
    from edgetune.train.optim import cosine_schedule, make_optimizer

    config, total = setup.config, setup.total
    trainable, params = model_lib.parameter_counts(model)
    print(f"edgetune: {config.model}: {params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
          f"({describe(config)}); {len(setup.train_set)} train / {len(setup.eval_set)} eval "
          f"examples; {total} steps on {setup.device} in {str(setup.dtype).removeprefix('torch.')}")
    optimizer = make_optimizer(config.optim, [p for p in model.parameters() if p.requires_grad],
                               config.lr, config.weight_decay, setup.device)
    scheduler = cosine_schedule(optimizer, int(config.warmup * total), total)
    hooks = adapters.hooks(model, config.method)
    batches = Batches(setup.train_set, config.batch_size, config.seed, _pad_id(setup.tokenizer),
                      packed=hooks.packs)
    guard = MemoryGuard(parse_size(config.ram)) if config.ram else None
    loop = Loop(model, optimizer, scheduler, batches, setup.eval_set, run_dir, config, total, guard,
                setup.task.objective(config), hooks)
    if start is not None:
        loop.restore(start)
    with lean_heap(config.grad_checkpointing) as release:  # the memory-first setting: see lean_heap
        summary = loop.run(on_step, after_step=release)
    if summary.stopped_for_memory:
        print(f"edgetune: stopped at step {summary.steps} to stay inside --ram {config.ram}: "
              f"{guard.message}; checkpoint written. "
              f"{_suggestion(config, setup.model_dir, setup.dtype)}")
    elif not summary.interrupted:
        save_adapter(run_dir, model, setup.tokenizer)
        update(run_dir, title=config.output)
        _report(summary, run_dir)
    return summary


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


def describe(config: TrainConfig) -> str:
    """The method and its size, e.g. 'LoRA rank 16' or 'prompt tuning, 20 virtual tokens'."""
    chosen = method(config.method)
    if chosen.name == "adalora":
        return f"AdaLoRA rank {config.adalora_init_rank} pruned to {config.rank} on average"
    if chosen.ranked:
        return f"{chosen.title} rank {config.rank}"
    if chosen.virtual_tokens:
        return f"{chosen.title}, {config.virtual_tokens} virtual tokens"
    return f"{chosen.title} on {', '.join(config.modules)}" if isinstance(config.modules, list) \
        else chosen.title


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
                  dtype="bf16" if bf16 else "fp32", budget_flag=f"--ram {config.ram}",
                  **_method_kwargs(config))
    print(f"edgetune: --plan auto for --ram {config.ram}: {plan.describe()} "
          f"(predicted peak {plan.memory.total / 2**30:.2f} GiB)")
    rank = plan.rank if method(config.method).ranked else config.rank
    return dataclasses.replace(config, quant=plan.quant, rank=rank, batch_size=plan.batch_size,
                               grad_accum=plan.grad_accum, optim=plan.optim,
                               grad_checkpointing=plan.grad_checkpointing, plan=None)


def _suggestion(config: TrainConfig, model_dir: Path, dtype: Any) -> str:
    from edgetune.plan.search import suggestion

    shape, budget, bf16 = _plan_inputs(config, model_dir, dtype)
    return suggestion(shape, budget, seq_len=config.seq_len,
                      target_batch=config.batch_size * config.grad_accum,
                      dtype="bf16" if bf16 else "fp32", device=config.device.replace("auto", "cpu"),
                      **_method_kwargs(config))


def _method_kwargs(config: TrainConfig) -> dict:
    """The planner's view of the run's method."""
    return {"method": method(config.method).name, "virtual_tokens": config.virtual_tokens,
            "init_rank": config.init_rank}


def _report(summary: Any, run_dir: Path) -> None:
    parts = [f"{summary.steps} steps", f"{summary.tokens_per_s:.0f} tokens/s",
             f"peak RSS {summary.peak_rss_bytes / 2**30:.2f} GiB"]
    if summary.train_loss is not None:
        parts.insert(1, f"train loss {summary.train_loss:.4f}")
    if summary.eval_loss is not None:
        parts.insert(2, f"eval loss {summary.eval_loss:.4f}")
    print(f"edgetune: done: {', '.join(parts)}. Adapter in {run_dir}")
