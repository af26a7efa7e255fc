"""The search: the best training setting whose predicted peak memory fits a budget.

Preference, documented and tested: precision first (bf16 base > int8 > nf4; fp32 AdamW states >
8-bit), then LoRA rank (higher first), then speed (no gradient checkpointing, then the largest
micro-batch up to the target batch). Gradient accumulation makes up the rest of the target batch.
"""

import math
from dataclasses import dataclass

from edgetune.errors import EdgetuneError
from edgetune.methods import METHODS
from edgetune.plan.memory import OPTIMS, QUANTS, Breakdown, Setting, breakdown
from edgetune.shape import ModelShape
from edgetune.units import format_size

RANKS = (64, 32, 16, 8, 4)
_QUANT_ORDER = {q: i for i, q in enumerate(QUANTS)}  # none (bf16/fp32) first
_OPTIM_ORDER = {o: i for i, o in enumerate(OPTIMS)}  # adamw first


@dataclass(frozen=True)
class Plan:
    """A training setting that fits, with its predicted memory."""

    quant: str  # "none" (base in the compute dtype), "int8" or "nf4": the train config's names
    rank: int
    batch_size: int
    grad_accum: int
    grad_checkpointing: bool
    optim: str  # "adamw" or "adamw8bit"
    dtype: str  # compute dtype: "bf16" or "fp32"
    seq_len: int
    memory: Breakdown
    method: str = "lora"  # edgetune.methods
    virtual_tokens: int = 20  # prompt, ptuning, prefix

    def describe(self) -> str:
        base = self.dtype if self.quant == "none" else self.quant
        ckpt = "checkpointing" if self.grad_checkpointing else "no checkpointing"
        return (f"{base}, {self._method_text()}, batch {self.batch_size} x {self.grad_accum}, {ckpt}, "
                f"{self.optim}")

    def _method_text(self) -> str:
        chosen = METHODS[self.method]
        if chosen.ranked:
            return f"rank {self.rank}" if chosen.name == "lora" else f"{chosen.title} rank {self.rank}"
        if chosen.virtual_tokens:
            return f"{chosen.title}, {self.virtual_tokens} virtual tokens"
        return chosen.title

    def train_flags(self) -> list[str]:
        """The `edgetune train` flags that run this plan."""
        chosen = METHODS[self.method]
        flags = [] if chosen.name == "lora" else ["--method", chosen.name]
        flags += ["--rank", str(self.rank)] if chosen.ranked else []
        flags += ["--virtual-tokens", str(self.virtual_tokens)] if chosen.virtual_tokens else []
        flags = ["--quant", self.quant] + flags + [
            "--batch-size", str(self.batch_size), "--grad-accum", str(self.grad_accum), "--optim",
            self.optim, "--seq-len", str(self.seq_len), "--dtype", self.dtype]
        return flags + ["--grad-checkpointing" if self.grad_checkpointing else "--no-grad-checkpointing"]


def _batches(target_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= target_batch]
    return sorted(set(sizes + [target_batch]), reverse=True)


def candidates(shape: ModelShape, *, seq_len: int, device: str = "cpu", target_batch: int = 16,
               dtype: str = "bf16", quants: tuple[str, ...] = QUANTS,
               ranks: tuple[int, ...] = RANKS, optims: tuple[str, ...] = OPTIMS,
               method: str = "lora", virtual_tokens: int = 20,
               init_rank: int | None = None) -> list[Plan]:
    """Every setting of the search space, most preferred first, each with its breakdown. Methods
    without a rank (IA3, learned inputs) are planned once, at the first of `ranks`."""
    plans = []
    if not METHODS[method].ranked:
        ranks = ranks[:1]
    for quant in quants:
        for optim in optims:
            for rank in ranks:
                for ckpt in (False, True):
                    for batch in _batches(target_batch):
                        setting = Setting(quant=quant, rank=rank, batch_size=batch, seq_len=seq_len,
                                          grad_checkpointing=ckpt, optim=optim, dtype=dtype,
                                          device=device, method=method,
                                          virtual_tokens=virtual_tokens, init_rank=init_rank)
                        plans.append(Plan(quant, rank, batch, math.ceil(target_batch / batch), ckpt,
                                          optim, dtype, seq_len, breakdown(shape, setting), method,
                                          virtual_tokens))
    plans.sort(key=_preference)
    return plans


def _preference(plan: Plan) -> tuple:
    return (_QUANT_ORDER[plan.quant], _OPTIM_ORDER[plan.optim], -plan.rank,
            plan.grad_checkpointing, -plan.batch_size)


def ranked(shape: ModelShape, budget_bytes: int, **kwargs) -> list[Plan]:
    """The settings that fit `budget_bytes` (peak plus safety margin), most preferred first."""
    return [p for p in candidates(shape, **kwargs) if p.memory.total <= budget_bytes]


def smallest(shape: ModelShape, **kwargs) -> Plan:
    """The setting that needs the least memory."""
    return min(candidates(shape, **kwargs), key=lambda p: p.memory.total)


def choose(shape: ModelShape, budget_bytes: int, *, seq_len: int, device: str = "cpu",
           target_batch: int = 16, dtype: str = "bf16", budget_flag: str = "--ram",
           **kwargs) -> Plan:
    """The most preferred setting that fits; EdgetuneError naming the smallest budget otherwise."""
    fits = ranked(shape, budget_bytes, seq_len=seq_len, device=device, target_batch=target_batch,
                  dtype=dtype, **kwargs)
    if fits:
        return fits[0]
    raise EdgetuneError(too_small_message(shape, budget_bytes, seq_len=seq_len, device=device,
                                          target_batch=target_batch, dtype=dtype,
                                          budget_flag=budget_flag, **kwargs))


def too_small_message(shape: ModelShape, budget_bytes: int, *, seq_len: int,
                      budget_flag: str = "--ram", **kwargs) -> str:
    """Why nothing fits: the smallest budget that would work, and what to change."""
    least = smallest(shape, seq_len=seq_len, **kwargs)
    hint = "a smaller model"
    for shorter in (seq_len // 2, seq_len // 4, 128, 64):
        if 16 <= shorter < seq_len and smallest(shape, seq_len=shorter, **kwargs).memory.total <= budget_bytes:
            hint = f"--seq-len {shorter} or a smaller model"
            break
    return (f"{budget_flag} {format_size(budget_bytes).replace(' ', '')} is too small for "
            f"{shape.name}: needs {format_size(least.memory.total)} with {least.describe()} at "
            f"--seq-len {seq_len}; try {hint}")


def alternatives(plans: list[Plan], chosen: Plan, n: int = 3) -> list[Plan]:
    """The next-best plans that differ from `chosen` in more than the micro-batch."""
    seen = {(chosen.quant, chosen.optim, chosen.rank, chosen.grad_checkpointing)}
    out = []
    for plan in plans:
        key = (plan.quant, plan.optim, plan.rank, plan.grad_checkpointing)
        if key not in seen:
            seen.add(key)
            out.append(plan)
        if len(out) == n:
            break
    return out


def suggestion(shape: ModelShape, budget_bytes: int, *, seq_len: int, target_batch: int,
               dtype: str = "bf16", device: str = "cpu", **kwargs) -> str:
    """One line for the trainer's memory guard: the settings that fit the budget, as train flags."""
    try:
        plan = choose(shape, budget_bytes, seq_len=seq_len, device=device,
                      target_batch=target_batch, dtype=dtype, **kwargs)
    except EdgetuneError as exc:
        return str(exc)
    return (f"`edgetune plan` suggests {plan.describe()} (predicted {format_size(plan.memory.train_peak)}"
            f"): {' '.join(plan.train_flags())}")
