"""Optimizers for the adapter weights: torch AdamW or bitsandbytes' 8-bit AdamW, and the schedule."""

import math
from typing import Any

import torch


def make_optimizer(name: str, params: list, lr: float, weight_decay: float, device: str) -> Any:
    """AdamW with fp32 states, or 8-bit blockwise states (paged only where paging means something)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                 fused=device == "cuda")
    import bitsandbytes as bnb

    if name == "paged_adamw8bit" and device != "cuda":
        print("edgetune: paged optimizers need CUDA: using adamw8bit on the CPU")
        name = "adamw8bit"
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    # min_8bit_size=0: the default (4096) keeps fp32 state for most LoRA matrices at small rank.
    return cls(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)


def cosine_schedule(optimizer: Any, warmup_steps: int, total_steps: int) -> Any:
    """Linear warm-up to the peak rate, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
