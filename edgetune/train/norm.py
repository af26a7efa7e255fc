"""RMSNorm layers computed in fewer passes over memory, forward and backward.

transformers' RMSNorm modules compute weight * x * rsqrt(mean(x^2) + eps) as five elementwise
operations, and autograd keeps their intermediate tensors and steps back through each of them. The norms
are frozen while LoRA trains, so the backward pass needs only the input gradient, which has a closed
form: with r = rsqrt(mean(x^2) + eps) and gw = grad * weight,

    d/dx = r * gw - x * r^3 * mean(gw * x)

One autograd function computes the forward pass in three passes over the activations (a fused norm
reduction, then two products) and that gradient in four, keeping only x and r for the backward pass
(docs/performance.md has the measurements).

A module is fused when its class name ends in "RMSNorm", its weight is frozen, fp32 and as long as the
last dimension, and its own output on a probe input equals weight * norm(x) or (1 + weight) * norm(x)
(Gemma's convention). Anything else, and any input not in fp32, keeps the module's own forward.
"""

from typing import Any, Callable

import torch


class _RMSNorm(torch.autograd.Function):
    """scale * x * rsqrt(mean(x^2) + eps) over the last dimension, for a frozen `scale`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        r = _inverse_rms(x, eps)
        ctx.save_for_backward(x, r, scale)
        return (x * r).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, r, scale = ctx.saved_tensors
        gw = grad * scale
        coef = torch.linalg.vecdot(gw, x).unsqueeze_(-1).mul_(r.pow(3)).div_(x.shape[-1])
        return gw.mul_(r).addcmul_(x, coef, value=-1), None, None


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # vector_norm reads x once; x.pow(2).mean() writes a squared copy first.
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def fuse_norms(model: Any) -> int:
    """Give every RMSNorm module of `model` that `_RMSNorm` reproduces the fused forward; returns how
    many there are."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        form = _matching_form(module)
        if form is not None:
            module.forward = _forward(module, module.forward, *form)
            count += 1
    return count


def _matching_form(module: Any) -> tuple[float, float] | None:
    """(eps, weight offset) with which `_RMSNorm` gives the module's own output, or None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.requires_grad
            or weight.dtype != torch.float32 or not isinstance(eps, float)):
        return None
    probe = torch.randn(3, len(weight), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = module(probe.to(weight.device))
        for offset in (0.0, 1.0):
            mine = _RMSNorm.apply(probe.to(weight.device), weight + offset, eps)
            if own.shape == mine.shape and torch.allclose(own, mine, rtol=1e-5, atol=1e-6):
                return eps, offset
    return None


def _forward(module: Any, own_forward: Callable, eps: float, offset: float) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.requires_grad:
            return own_forward(x)
        return _RMSNorm.apply(x, weight + offset if offset else weight, eps)

    return forward
