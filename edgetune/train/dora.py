"""DoRA layers computed into one output buffer, forward and backward, like the fused LoRA layers.

DoRA rescales each output row of the LoRA-updated weight W + s B A to a learned magnitude m:
y = m / ||W + s B A|| * (x W^T + s (x A^T) B^T) + bias, the norm taken per row and treated as a
constant in the backward pass (DoRA's paper, section 4.3; PEFT does the same). PEFT computes it from
the base output and the low-rank output, each kept for the backward pass, after building B A through
an identity matrix and the updated weight for its norm: output-sized tensors and weight-sized
temporaries on every call.

Here the norm comes from r x out products, without forming B A or the updated weight:
||W + s B A||^2 = ||W||^2 + 2 s sum(B * (W A^T)) + s^2 sum(B (A A^T) * B) per row, with ||W||^2 of
the frozen weight computed once. The output is written as in `edgetune.train.lora` and one output-
sized tensor (before the rescaling) is kept for the magnitude's gradient. The values are PEFT's up to
the order of floating-point operations (tests/test_methods.py). Layers this does not cover (a base
that is not a plain dense layer in the input's dtype, dropout, several adapters) keep PEFT's forward.
"""

from typing import Any, Callable

import torch


class _DoraLinear(torch.autograd.Function):
    """m / norm * (x @ W.T + scale * (x @ A.T) @ B.T) + bias for a frozen W; grads for x, A, B, m."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor,
                weight: torch.Tensor, weight_sq: torch.Tensor, bias: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            wa = a @ weight.t()  # [r, out]: (W A^T)^T
            cross = (b * wa.t()).sum(1)
            square = ((b @ (a @ a.t())) * b).sum(1)
            norm = (weight_sq + 2 * scale * cross + scale * scale * square).clamp_min_(0).sqrt_()
        xa = x2 @ a.t()
        pre = torch.addmm(x2 @ weight.t(), xa, b.t(), alpha=scale)
        gain = m / norm
        out = pre * gain if bias is None else torch.addcmul(bias, pre, gain)
        ctx.save_for_backward(x2, xa, a, b, weight, pre, gain, norm)
        ctx.scale, ctx.shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, xa, a, b, weight, pre, gain, norm = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_m = (g * pre).sum(0).div_(norm) if ctx.needs_input_grad[3] else None
        g = g * gain
        gb = g @ b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, a, alpha=ctx.scale).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_a = (gb.t() @ x2).mul_(ctx.scale)
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ xa).mul_(ctx.scale)
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None


def fuse_dora(model: Any) -> int:
    """Give every PEFT DoRA linear layer over a plain dense layer the fused forward; returns how many."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and type(m.base_layer) is torch.nn.Linear
              and getattr(m, "lora_variant", {})]
    for module in layers:
        module.forward = _forward(module, module.forward)
    return len(layers)


def _forward(module: Any, peft_forward: Callable) -> Callable:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else _single_dora_adapter(module)
        base = module.base_layer
        if adapter is None or base.weight.requires_grad or base.weight.dtype != x.dtype:
            return peft_forward(x, *args, **kwargs)
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        m = module.lora_magnitude_vector[adapter].weight
        bias = base.bias
        if (a.dtype != x.dtype or b.dtype != x.dtype or m.dtype != x.dtype
                or (bias is not None and (bias.requires_grad or bias.dtype != x.dtype))):
            return peft_forward(x, *args, **kwargs)
        return _DoraLinear.apply(x, a, b, m, base.weight, _weight_sq(module), bias,
                                 module.scaling[adapter])

    return forward


def _weight_sq(module: Any) -> torch.Tensor:
    """||W||^2 per output row of the frozen base weight, computed once."""
    cached = getattr(module, "_edgetune_weight_sq", None)
    weight = module.base_layer.weight
    if cached is None or cached[0] is not weight:
        cached = (weight, weight.detach().pow(2).sum(1))
        module._edgetune_weight_sq = cached
    return cached[1]


def _single_dora_adapter(module: Any) -> str | None:
    """The one active DoRA adapter without dropout, or None when PEFT's forward is needed."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    if (adapter not in module.lora_A or adapter not in module.lora_variant
            or not isinstance(module.lora_dropout[adapter], torch.nn.Identity)):
        return None
    return adapter
