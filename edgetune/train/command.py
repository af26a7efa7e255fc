"""`edgetune train`: load, tokenize, train with LoRA/QLoRA, and leave a PEFT adapter in the run folder."""

import contextlib
import dataclasses
import math
import os
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
    from edgetune.train.distributed import launched

    if (config.nproc or 1) > 1 and not launched():
        from edgetune.train.launch import launch

        return launch(config, (task or Supervised()).verb)
    summary = train(config, task=task)
    if summary.interrupted and os.environ.get("RANK", "0") == "0":  # rank 0 speaks for the run
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
    locked while the run lasts; SIGINT and SIGTERM end it with a checkpoint (see signals.py). In a
    process launched as one rank of a data-parallel run, rank 0 alone checks, locks and writes the
    folder, and hands what it read to the other ranks (distributed.py).
    """
    from edgetune.train.distributed import joined
    from edgetune.train.heap import reset_peak_rss

    reset_peak_rss()  # the run's peak is its own, from here: what the guard and the summary report
    with stop_on_signals(), joined(config.nproc, config.dist_timeout, config.device) as world:
        world.check_same(recorded_settings(config))
        run_dir = Path(config.output).expanduser()
        task = task or Supervised()
        with contextlib.ExitStack() as held:  # rank 0's lock on the run folder
            if config.resume:
                return _resume(config, run_dir, on_step, task, world, held)
            return _fresh(config, run_dir, on_step, task, world, held)


def _lock(run_dir: Path):
    return folders.folder_lock(run_dir, f"run folder {run_dir}", verb="edgetune train")


def _check_output(config: TrainConfig, run_dir: Path) -> None:
    """Refuse a folder edgetune did not make, and a run that would be replaced without --force."""
    if folders.inspect_output(run_dir, RUN_MARKERS) == "ours" and not config.force:
        raise EdgetuneError(f"output folder {run_dir} holds a run: pass --force to replace it "
                            "or --resume to continue it")


def _fresh(config: TrainConfig, run_dir: Path, on_step: Callable | None, task: Supervised,
           world: Any, held: contextlib.ExitStack) -> Any:
    world.on_main(lambda: _check_output(config, run_dir))
    setup = prepare(config, run_dir, task, world)  # a bad flag, file or model fails here, before any write
    model = load_model(setup)  # only now, with everything read and loaded, is a folder made

    def claim() -> None:
        with folders.disk_errors(run_dir.parent):
            run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(_lock(run_dir))
        _check_output(config, run_dir)  # again, now that no other process can be writing it
        with folders.disk_errors(run_dir):
            folders.clear(run_dir)
        text = yaml.safe_dump(recorded_settings(setup.config), sort_keys=False)
        folders.write_text_atomic(run_dir / RUN_CONFIG, text)
        if setup.template is not None:
            folders.write_text_atomic(run_dir / CHAT_TEMPLATE, setup.template)

    world.on_main(claim)
    return _run(setup, model, run_dir, None, on_step, world)


def _resume(config: TrainConfig, run_dir: Path, on_step: Callable | None, task: Supervised,
            world: Any, held: contextlib.ExitStack) -> Any:
    from edgetune.train.checkpoint import completed, micro_batches, step_of

    def claim() -> tuple:
        if not (run_dir / RUN_CONFIG).is_file():
            raise EdgetuneError(f"--resume: {run_dir} is not an edgetune run (no {RUN_CONFIG})")
        held.enter_context(_lock(run_dir))
        resumed, changes = resumed_config(config, run_dir)
        for folder in (run_dir, run_dir / "checkpoints"):  # what an interrupted process left
            folders.remove_leftovers(folder)
        start = (completed(run_dir) or [None])[-1]
        truncate_log(run_dir, step_of(start) if start else 0)
        resumed, change = per_rank_accum(resumed, micro_batches(start) if start else None, world.size)
        return resumed, changes + change, start

    config, changes, start = world.on_main(claim)
    setup = prepare(config, run_dir, task, world)
    model = load_model(setup)
    changed = f"; changed: {', '.join(changes)}" if changes else ""
    if start is None:
        print(f"edgetune: {run_dir} has no checkpoint yet: starting it again from step 0 with its "
              f"recorded settings{changed}")
    else:
        print(f"edgetune: resuming {run_dir} at step {step_of(start)} of {setup.total} with its "
              f"recorded settings{changed}")
    return _run(setup, model, run_dir, start, on_step, world)


def per_rank_accum(config: TrainConfig, micro: int | None, ranks: int) -> tuple[TrainConfig, list]:
    """The run's settings with --grad-accum set so that `ranks` processes read the `micro`
    micro-batches per step its checkpoint was written with: the global batch, and with it the
    examples of every step, stays the same whatever the number of processes."""
    if micro is None or micro == ranks * config.grad_accum:
        return config, []
    if micro % ranks:
        raise EdgetuneError(f"--resume: each step of this run reads {micro} micro-batches, which "
                            f"{ranks} processes cannot share equally: use a number of processes "
                            f"that divides {micro}")
    accum = micro // ranks
    change = f"--grad-accum {config.grad_accum} -> {accum} ({ranks} process{'es' * (ranks > 1)})"
    return dataclasses.replace(config, grad_accum=accum), [change]


def prepare(config: TrainConfig, run_dir: Path, task: Supervised | None = None,
            world: Any = None) -> Setup:
    """Check the data, device and model and tokenize; loads no weights and writes no run file."""
    import torch

    from edgetune.train import model as model_lib
    from edgetune.train.distributed import World, default_threads

    world = world or World()
    if config.threads or world.size > 1:
        torch.set_num_threads(config.threads or default_threads(world.local_size))
    task = task or Supervised()
    records = task.read_records(config)  # cheap checks first: a bad file fails before the model resolves
    if config.template and not config.resume:
        templates.resolve(config.template)
    device = model_lib.pick_device(config.device)
    dtype = model_lib.pick_dtype(config.dtype, device)
    model_dir = models.resolve(config.model, config.cache_dir)
    models.check_trainable(model_dir)
    if config.plan == "auto":
        from edgetune.train.autoplan import apply_plan

        config = apply_plan(config, model_dir, device, dtype, world.local_size)
    tokenizer = _tokenizer(model_dir)
    config, template = _chat_template(config, tokenizer, records, run_dir)
    train_set, eval_set = task.examples(config, tokenizer, records, model_dir)
    global_batch = config.batch_size * config.grad_accum * world.size
    steps_per_epoch = math.ceil(len(train_set) / global_batch)
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
         on_step: Callable | None, world: Any) -> Any:
    """Train (from checkpoint `start`, if any) and write the adapter (rank 0)."""
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
    ranks = (f"; {world.size} processes x {config.grad_accum} x {config.batch_size} examples per step"
             if world.size > 1 else "")
    print(f"edgetune: {config.model}: {params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
          f"({describe(config)}); {len(setup.train_set)} train / {len(setup.eval_set)} eval "
          f"examples; {total} steps on {setup.device} in {str(setup.dtype).removeprefix('torch.')}"
          f"{ranks}")
    optimizer = make_optimizer(config.optim, [p for p in model.parameters() if p.requires_grad],
                               config.lr, config.weight_decay, setup.device)
    scheduler = cosine_schedule(optimizer, int(config.warmup * total), total)
    hooks = adapters.hooks(model, config.method)
    batches = Batches(setup.train_set, config.batch_size, config.seed, _pad_id(setup.tokenizer),
                      packed=hooks.packs)
    # --ram is this machine's: its processes share it, each watching its own part
    guard = MemoryGuard(parse_size(config.ram) // world.local_size) if config.ram else None
    loop = Loop(model, optimizer, scheduler, batches, setup.eval_set, run_dir, config, total, guard,
                setup.task.objective(config), world, hooks)
    if start is not None and world.main:
        loop.restore(start)
    loop.share()  # every rank starts from rank 0's adapter, optimizer state and data position
    with lean_heap(config.grad_checkpointing) as release:  # the memory-first setting: see lean_heap
        summary = loop.run(on_step, after_step=release)
    if summary.stopped_for_memory:
        from edgetune.train.autoplan import memory_suggestion

        why = memory_suggestion(config, setup.model_dir, setup.device, setup.dtype, guard.peak)
        print(f"edgetune: stopped at step {summary.steps} to stay inside --ram {config.ram}: "
              f"{loop.memory_message}; checkpoint written. {why[0].upper()}{why[1:]}")
    elif not summary.interrupted and world.main:
        if guard is not None and guard.message:
            print(f"edgetune: warning: on the last step, {guard.message}")
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


def _report(summary: Any, run_dir: Path) -> None:
    parts = [f"{summary.steps} steps", f"{summary.tokens_per_s:.0f} tokens/s",
             f"peak RSS {summary.peak_rss_bytes / 2**30:.2f} GiB"]
    if summary.train_loss is not None:
        parts.insert(1, f"train loss {summary.train_loss:.4f}")
    if summary.eval_loss is not None:
        parts.insert(2, f"eval loss {summary.eval_loss:.4f}")
    print(f"edgetune: done: {', '.join(parts)}. Adapter in {run_dir}")
