"""The search: the best training setting whose predicted peak memory fits a budget.

Preference, documented and tested: precision first (bf16 base > int8 > nf4; fp32 AdamW states >
8-bit), then LoRA rank (higher first), then speed (no gradient checkpointing, then the largest
micro-batch up to the target batch). Gradient accumulation makes up the rest of the target batch.
"""

import dataclasses
import math
from dataclasses import dataclass

from edgetune.errors import EdgetuneError
from edgetune.methods import METHODS
from edgetune.plan.memory import OPTIMS, QUANTS, RUNTIME_BYTES, Breakdown, Setting, breakdown
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
    device: str = "cpu"
    method: str = "lora"  # edgetune.methods
    virtual_tokens: int = 20  # prompt, ptuning, prefix
    init_rank: int | None = None  # adalora (None: 1.5 x rank)

    @property
    def setting(self) -> Setting:
        return Setting(self.quant, self.rank, self.batch_size, self.seq_len, self.grad_checkpointing,
                       self.optim, self.dtype, device=self.device, grad_accum=self.grad_accum,
                       method=self.method, virtual_tokens=self.virtual_tokens,
                       init_rank=self.init_rank)

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
        if chosen.name == "adalora" and self.init_rank is not None:
            flags += ["--init-rank", str(self.init_rank)]
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
    check_seq_len(shape, seq_len)
    plans = []
    if not METHODS[method].ranked:
        ranks = ranks[:1]
    for quant in quants:
        for optim in optims:
            for rank in ranks:
                for ckpt in (False, True):
                    for batch in _batches(target_batch):
                        accum = math.ceil(target_batch / batch)
                        setting = Setting(quant=quant, rank=rank, batch_size=batch, seq_len=seq_len,
                                          grad_checkpointing=ckpt, optim=optim, dtype=dtype,
                                          device=device, grad_accum=accum, method=method,
                                          virtual_tokens=virtual_tokens, init_rank=init_rank)
                        plans.append(Plan(quant, rank, batch, accum, ckpt, optim, dtype, seq_len,
                                          breakdown(shape, setting), device, method, virtual_tokens,
                                          init_rank))
    plans.sort(key=_preference)
    return plans


def _preference(plan: Plan) -> tuple:
    return (_QUANT_ORDER[plan.quant], _OPTIM_ORDER[plan.optim], -plan.rank,
            plan.grad_checkpointing, -plan.batch_size)


def check_seq_len(shape: ModelShape, seq_len: int) -> None:
    """A sequence longer than the model's positions is a user error that names the longest."""
    if shape.max_positions and seq_len > shape.max_positions:
        raise EdgetuneError(f"--seq-len {seq_len} is longer than {shape.name} holds "
                            f"(max_position_embeddings {shape.max_positions}): use --seq-len "
                            f"{shape.max_positions} or less")


def ranked(shape: ModelShape, budget_bytes: int, *, scale: float = 1.0, **kwargs) -> list[Plan]:
    """The settings that fit `budget_bytes` (peak plus safety margin, times `scale` when a
    measurement said the model runs that much over), most preferred first."""
    return [p for p in candidates(shape, **kwargs) if p.memory.total * scale <= budget_bytes]


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
    budget = f"{budget_flag} {_size_flag(budget_bytes)}"
    needs = (f"{shape.name} needs {budget_flag} {_size_flag(least.memory.total)} with "
             f"{least.describe()} at --seq-len {seq_len}")
    runtime = min(RUNTIME_BYTES, least.memory.terms["runtime"])
    if budget_bytes < runtime:
        return (f"{budget} is less than the trainer's runtime alone ({format_size(runtime)}: "
                f"torch, transformers and peft loaded); {needs}")
    hint = "a smaller model"
    for shorter in (seq_len // 2, seq_len // 4, 128, 64):
        if 16 <= shorter < seq_len and smallest(shape, seq_len=shorter, **kwargs).memory.total <= budget_bytes:
            hint = f"--seq-len {shorter} or a smaller model"
            break
    return f"{budget} is too small: {needs}; or try {hint}"


def _size_flag(n: int) -> str:
    """A size as a flag value that names at least `n` bytes (rounded up, never down)."""
    gib = math.ceil(n / 2**30 * 100) / 100
    return f"{gib:.2f}gb" if gib >= 1 else f"{math.ceil(n / 2**20)}mb"


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


def _same(planned: Setting, ran: Setting) -> bool:
    """Whether a plan is the run's own setting; the rank of a method without one does not count."""
    if not METHODS[ran.method].ranked:
        planned = dataclasses.replace(planned, rank=ran.rank)
    return planned == ran


def suggestion(shape: ModelShape, budget_bytes: int, *, ran: Setting, measured_peak: int,
               target_batch: int, budget_flag: str = "--ram") -> str:
    """One line for the trainer's memory guard: how the run's measured peak compares with the
    planner's prediction for its settings, and the best other settings that fit the budget once
    every prediction is scaled by that ratio (never below 1)."""
    predicted = breakdown(shape, ran).peak
    ratio = measured_peak / predicted
    why = (f"the planner predicted {format_size(predicted)} for these settings; measured "
           f"{format_size(measured_peak)} ({ratio:.2f}x)")
    scale = max(1.0, ratio)
    question = {"seq_len": ran.seq_len, "device": ran.device, "target_batch": target_batch,
                "dtype": ran.dtype, "method": ran.method, "virtual_tokens": ran.virtual_tokens,
                "init_rank": ran.init_rank}
    others = [p for p in ranked(shape, budget_bytes, scale=scale, **question)
              if not _same(p.setting, ran)]
    scaled = f" scaled by {scale:.2f}" if scale > 1 else ""
    if not others:
        least = smallest(shape, **question)
        return (f"{why}; with predictions{scaled}, nothing else fits {budget_flag} "
                f"{format_size(budget_bytes)}: {least.describe()} needs "
                f"{format_size(least.memory.total * scale)}")
    plan = others[0]
    return (f"{why}; with predictions{scaled}, `edgetune plan` suggests {plan.describe()} (predicted "
            f"{format_size(plan.memory.peak * scale)}): {' '.join(plan.train_flags())}")
