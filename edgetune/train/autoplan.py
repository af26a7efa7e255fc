"""The trainer's side of the planner: `--plan auto`, and what the memory guard suggests when it stops.

`--plan auto` asks the planner the question `edgetune plan` asks, with the same defaults: the model's
shape, the --ram budget, --seq-len, the effective batch (--batch-size x --grad-accum) and the compute
dtype; it prints that question as an `edgetune plan` command, so the two can be compared.
"""

import dataclasses
from pathlib import Path
from typing import Any

from edgetune.methods import method
from edgetune.plan.memory import Setting
from edgetune.plan.search import choose, suggestion
from edgetune.shape import shape_from_model_dir
from edgetune.train.config import TrainConfig
from edgetune.units import format_size, parse_size


def _dtype_name(dtype: Any) -> str:
    return "bf16" if str(dtype).endswith("bfloat16") else "fp32"


def _device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def method_kwargs(config: TrainConfig) -> dict:
    """The planner's view of the run's method."""
    return {"method": method(config.method).name, "virtual_tokens": config.virtual_tokens,
            "init_rank": config.init_rank}


def setting_of(config: TrainConfig, device: str, dtype: Any) -> Setting:
    """The planner's view of the settings a run trains with."""
    optim = "adamw" if config.optim == "adamw" else "adamw8bit"  # paged or not: the same state
    return Setting(quant=config.quant, rank=config.rank, batch_size=config.batch_size,
                   seq_len=config.seq_len, grad_checkpointing=config.grad_checkpointing, optim=optim,
                   dtype=_dtype_name(dtype), double_quant=config.double_quant, device=_device(device),
                   grad_accum=config.grad_accum, **method_kwargs(config))


def plan_command(config: TrainConfig, device: str, dtype: Any) -> str:
    """The `edgetune plan` command that asks what `--plan auto` asks."""
    budget = "--device cuda --vram" if _device(device) == "cuda" else "--ram"
    chosen = method(config.method)
    flags = "" if chosen.name == "lora" else f" --method {chosen.name}"
    flags += f" --virtual-tokens {config.virtual_tokens}" if chosen.virtual_tokens else ""
    return (f"edgetune plan --model {config.model} {budget} {config.ram} --seq-len {config.seq_len} "
            f"--batch {config.batch_size * config.grad_accum} --dtype {_dtype_name(dtype)}{flags}")


def apply_plan(config: TrainConfig, model_dir: Path, device: str, dtype: Any,
               processes: int = 1) -> TrainConfig:
    """--plan auto: the planner's quantization, rank, batch, checkpointing and optimizer, for one of
    the `processes` on this machine that share --ram."""
    shape = shape_from_model_dir(model_dir)
    target = config.batch_size * config.grad_accum
    plan = choose(shape, parse_size(config.ram) // processes, seq_len=config.seq_len,
                  device=_device(device), target_batch=target, dtype=_dtype_name(dtype),
                  budget_flag="--ram", **method_kwargs(config))
    print(f"edgetune: --plan auto for --ram {config.ram}, --seq-len {config.seq_len}, effective batch "
          f"{target}, {_dtype_name(dtype)}: {plan.describe()}, predicted peak "
          f"{format_size(plan.memory.peak)} ({format_size(plan.memory.total)} with the margin); "
          f"the same question as `{plan_command(config, device, dtype)}`")
    rank = plan.rank if method(config.method).ranked else config.rank  # IA3, learned inputs: no rank
    return dataclasses.replace(config, quant=plan.quant, rank=rank, batch_size=plan.batch_size,
                               grad_accum=plan.grad_accum, optim=plan.optim,
                               grad_checkpointing=plan.grad_checkpointing, plan=None)


def memory_suggestion(config: TrainConfig, model_dir: Path, device: str, dtype: Any,
                      measured_peak: int) -> str:
    """After the guard stopped a run: measured against predicted, and settings that fit instead."""
    return suggestion(shape_from_model_dir(model_dir), parse_size(config.ram), ran=setting_of(config, device, dtype),
                      measured_peak=measured_peak,
                      target_batch=config.batch_size * config.grad_accum)
