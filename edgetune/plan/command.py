"""`edgetune plan`: the training settings that fit a memory budget, why, and how long they take.

Never imports torch: shapes come from config.json, GGUF headers or the catalogue, and the memory model
is arithmetic. `--calibrate` times a matmul in a child process.
"""

import json
import math
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.plan import search, timing
from edgetune.plan.catalogue import CATALOGUE, all_shapes, catalogue_shape
from edgetune.plan.config import PlanConfig
from edgetune.plan.lengths import Lengths, choose_seq_len, measure
from edgetune.plan.memory import SAFETY_MARGIN, adapter_bytes
from edgetune.shape import ModelShape, shape_from_gguf, shape_from_model_dir
from edgetune.tables import columns
from edgetune.units import format_size

DEFAULT_SEQ_LEN = 512
PEAK_NOTE = ("predicted peak resident memory (VmHWM / max RSS, as the kernel reports it; it counts "
             "the memory-mapped checkpoint file too)")


def main(config: PlanConfig) -> int:
    gflops = timing.calibrate() if config.calibrate else timing.cached_gflops()
    if config.calibrate:
        print(f"edgetune: calibrated this machine: {gflops['bf16']:.1f} GFLOP/s bf16, "
              f"{gflops['fp32']:.1f} GFLOP/s fp32 (cached)")
    if config.model is None:
        return _catalogue(config, gflops)
    shape, model_dir = load_shape(config.model)
    lengths = measure(config.data, model_dir) if config.data else None
    seq_len = config.seq_len or _default_seq_len(shape, lengths)
    kwargs = _search_kwargs(config, seq_len)
    fits = search.ranked(shape, per_process(config), **kwargs)
    if not fits:
        raise EdgetuneError(search.too_small_message(shape, per_process(config),
                                                     budget_flag=config.budget_flag, **kwargs))
    plan, alternatives = fits[0], search.alternatives(fits, fits[0])
    speed, reduce_s = _speed(config, shape, plan, gflops)
    target = _target_fit(config.target, shape, seq_len)
    if config.json:
        out = as_json(config, shape, plan, alternatives, speed, lengths, target)
        out.update(nproc=config.nproc, budget_per_process_bytes=per_process(config),
                   allreduce_s_per_step=round(reduce_s, 4))
        print(json.dumps(out, indent=2))
    else:
        print(render(config, shape, plan, alternatives, speed, gflops, lengths, target))
        if config.nproc > 1:
            print(f"{config.nproc} processes: memory above is per process ({config.budget_flag} "
                  f"shared, {format_size(per_process(config))} each), --batch {config.batch} is "
                  f"their global batch; speed counts {reduce_s * 1000:.0f} ms per step to all-reduce "
                  f"{format_size(adapter_bytes(shape, plan.setting))} of adapter gradients (gloo on one "
                  f"machine, docs/distributed.md; across machines the network sets it)")
    return 0


def per_process(config: PlanConfig) -> int:
    """The budget of one process: the processes on this machine share its memory."""
    return config.budget_bytes // config.nproc


def _speed(config: PlanConfig, shape: ModelShape, plan: search.Plan,
           gflops: dict | None) -> tuple[float, float]:
    """Tokens/s of the whole run and seconds of all-reduce per step."""
    single = timing.tokens_per_second(shape, plan.setting, gflops)
    step_tokens = plan.batch_size * plan.grad_accum * config.nproc * plan.seq_len
    return timing.data_parallel(single, config.nproc, step_tokens, adapter_bytes(shape, plan.setting))


def load_shape(model: str) -> tuple[ModelShape, Path | None]:
    """(shape, local folder or None) for a catalogue name, an HF folder or a .gguf file."""
    path = Path(model).expanduser()
    if path.is_dir():
        return shape_from_model_dir(path), path
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgetuneError(f"model file {model} is not a .gguf file; pass a GGUF file, an HF "
                                "folder or a catalogue name")
        return shape_from_gguf(path), None
    if model.lower() in CATALOGUE:
        return catalogue_shape(model), None
    raise EdgetuneError(f"model {model} is neither a folder, a .gguf file nor a catalogue name "
                        f"({', '.join(CATALOGUE)})")


def _default_seq_len(shape: ModelShape, lengths: Lengths | None) -> int:
    """From the data when given, else DEFAULT_SEQ_LEN; never more than the model holds."""
    seq_len = choose_seq_len(lengths) if lengths else DEFAULT_SEQ_LEN
    return min(seq_len, shape.max_positions or seq_len)


def compute_dtype(config: PlanConfig) -> str:
    if config.dtype != "auto":
        return config.dtype
    if config.device == "cuda":
        return "bf16"  # every GPU small enough to plan for since Ampere has bf16
    from edgetune.hardware import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "fp32"


def _search_kwargs(config: PlanConfig, seq_len: int) -> dict:
    kwargs = {"seq_len": seq_len, "device": config.device,
              "target_batch": max(1, math.ceil(config.batch / config.nproc)),
              "dtype": compute_dtype(config), "method": config.method,
              "virtual_tokens": config.virtual_tokens}
    if config.rank is not None:
        kwargs["ranks"] = (config.rank,)
    return kwargs


def _target_fit(target: str | None, shape: ModelShape, seq_len: int):
    """What edgetune.devices says of running the fine-tuned model on `target`, if asked."""
    if target is None:
        return None
    from edgetune.devices.selection import fits

    return fits(target, shape, max(seq_len, 2048))


def _steps(lengths: Lengths | None, plan: search.Plan, epochs: float,
           nproc: int = 1) -> tuple[int, int] | None:
    """(optimizer steps, tokens trained) for the data, or None without data."""
    if lengths is None:
        return None
    per_step = plan.batch_size * plan.grad_accum * nproc
    steps = max(1, math.ceil(epochs * len(lengths.counts) / per_step))
    return steps, int(epochs * lengths.tokens(plan.seq_len))


def render(config: PlanConfig, shape: ModelShape, plan: search.Plan, alternatives: list,
           speed: float, gflops: dict | None, lengths: Lengths | None, target) -> str:
    budget = per_process(config)
    lines = [f"{shape.name}: {shape.params / 1e6:,.0f}M parameters; {config.budget_flag} "
             f"{format_size(config.budget_bytes)} (binary units); seq-len {plan.seq_len}; "
             f"effective batch {config.batch}; {config.device} in {plan.dtype}",
             f"plan: {plan.describe()}", "", f"memory: {PEAK_NOTE}"]
    for name, value in plan.memory.terms.items():
        lines.append(f"  {name:<18}{format_size(value):>12}")
    lines.append(f"  {'training step':<18}{format_size(plan.memory.train_peak):>12}")
    lines.append(f"  {f'+ {SAFETY_MARGIN:.0%} margin':<18}{format_size(plan.memory.total):>12}"
                 f"  must fit {format_size(budget)}")
    if plan.memory.load_peak > plan.memory.train_peak:
        lines.append(f"  max RSS will read {format_size(plan.memory.peak)}: while loading, the mapped "
                     "checkpoint's file pages (dropped by the kernel under pressure)")
    lines.append("")
    source = "calibrated" if gflops else "a guess: run with --calibrate to time this machine"
    lines.append(f"speed: about {speed:,.0f} tokens/s ({source})")
    counted = _steps(lengths, plan, config.epochs, config.nproc)
    if counted is not None:
        steps, tokens = counted
        how = "" if lengths.exact else " (estimated at 4 characters per token)"
        lines.append(f"data: {len(lengths.counts)} examples, 95% within {lengths.percentile(95)} tokens"
                     f"{how}; {steps} steps, {tokens:,} tokens, ETA "
                     f"{timing.format_duration(timing.eta_seconds(tokens, speed))}")
    if alternatives:
        lines.append("next best:")
        lines += [f"  {p.describe():<58}{format_size(p.memory.total):>12}" for p in alternatives]
    if target is not None:
        lines.append(f"on {config.target}: {target.summary()}")
    lines.append(f"train with: edgetune train --model {_train_ref(config.model)} "
                 f"{' '.join(plan.train_flags())}{_guard_flag(config)}"
                 + (f" --nproc {config.nproc}" if config.nproc > 1 else ""))
    return "\n".join(lines)


def _guard_flag(config: PlanConfig) -> str:
    """The trainer's --ram, so that its memory guard watches the budget this plan was made for
    (the guard reads host memory: none for a --vram plan)."""
    return f" --ram {config.ram}" if config.device == "cpu" else ""


def _train_ref(model: str) -> str:
    """What `edgetune train --model` takes for this model: a catalogue name becomes its hub id."""
    from edgetune.models import BUILTIN

    key = model.lower()
    if key in CATALOGUE and key not in BUILTIN and not Path(model).exists():
        return CATALOGUE[key][0]
    return model


def as_json(config: PlanConfig, shape: ModelShape, plan: search.Plan, alternatives: list,
            speed: float, lengths: Lengths | None, target) -> dict:
    def one(p: search.Plan) -> dict:
        return {"method": p.method, "quant": p.quant, "rank": p.rank, "batch_size": p.batch_size,
                "grad_accum": p.grad_accum, "grad_checkpointing": p.grad_checkpointing,
                "optim": p.optim, "dtype": p.dtype, "seq_len": p.seq_len,
                "memory": {**p.memory.terms, "load_peak": p.memory.load_peak,
                           "peak": p.memory.peak, "total": p.memory.total},
                "train_flags": p.train_flags()}

    out = {"model": shape.name, "params": shape.params, "budget_bytes": config.budget_bytes,
           "device": config.device, "safety_margin": SAFETY_MARGIN, "plan": one(plan),
           "alternatives": [one(p) for p in alternatives], "tokens_per_s": round(speed, 1)}
    counted = _steps(lengths, plan, config.epochs, config.nproc)
    if counted is not None:
        out["data"] = {"examples": len(lengths.counts), "exact_tokens": lengths.exact,
                       "steps": counted[0], "tokens": counted[1],
                       "eta_s": round(timing.eta_seconds(counted[1], speed))}
    if target is not None:
        out["target"] = {"device": config.target, "fits": target.fits, "summary": target.summary()}
    return out


def _catalogue(config: PlanConfig, gflops: dict | None) -> int:
    """Every catalogue model rated against the budget: its plan, or the budget it would need."""
    seq_len = config.seq_len or DEFAULT_SEQ_LEN
    rows, records = [], []
    for shape in all_shapes():
        kwargs = _search_kwargs(config, seq_len)
        fits = search.ranked(shape, config.budget_bytes, **kwargs)
        if fits:
            plan = fits[0]
            speed = timing.tokens_per_second(shape, plan.setting, gflops)
            rows.append((shape.name, f"{shape.params / 1e9:.2f}B", "yes", plan.describe(),
                         format_size(plan.memory.total), f"{speed:,.1f}"))
            records.append({"model": shape.name, "fits": True, "plan": plan.describe(),
                            "total": plan.memory.total, "tokens_per_s": round(speed, 1)})
        else:
            least = search.smallest(shape, **kwargs)
            rows.append((shape.name, f"{shape.params / 1e9:.2f}B", "no",
                         f"needs {format_size(least.memory.total)}", "", ""))
            records.append({"model": shape.name, "fits": False, "needs": least.memory.total})
    if config.json:
        print(json.dumps({"budget_bytes": config.budget_bytes, "seq_len": seq_len,
                          "models": records}, indent=2))
        return 0
    header = ("model", "params", "fits", "plan", "memory", "tok/s")
    print(f"{config.budget_flag} {format_size(config.budget_bytes)} (binary units), seq-len {seq_len}, "
          f"effective batch {config.batch}; memory is the {PEAK_NOTE} plus {SAFETY_MARGIN:.0%}")
    print(columns([header] + rows))
    return 0
