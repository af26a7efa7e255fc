"""LoRA layers computed into one output buffer, forward and backward.

PEFT computes a LoRA linear layer as `base(x) + B(A(x)) * scale`: four tensors the size of the
output per call (the base output, B's output, the scaled copy, the sum), and in the backward pass a
scaled gradient and a second input gradient that autograd then adds to the first. On the CPU each
such tensor of a few MiB is fresh memory, and first touches cost more than the arithmetic
(docs/performance.md).

Here the base matmul writes the output and the low-rank product is added into it by `addmm_`; the
backward pass does the same for the input gradient. The values are those of PEFT's formula, up to
the order of floating-point additions. Layers this does not cover (dropout, DoRA and other variants,
several active adapters, mixed dtypes, a base layer with no frozen matmuls to build on) keep PEFT's
forward.
"""

from typing import Any, Callable

import torch


class _LoraLinear(torch.autograd.Function):
    """x @ W.T + bias + scale * (x @ A.T) @ B.T for a frozen W; gradients for x, A and B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, frozen: Any,
                bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = frozen.forward(x2, bias)
        xa = x2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.frozen, ctx.scale, ctx.shape = frozen, scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, xa, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.frozen.grad_input(g).addmm_(gb, a, alpha=ctx.scale).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_a = (gb.t() @ x2).mul_(ctx.scale)
        if ctx.needs_input_grad[2]:  # as (xa.T g).T: MKL runs this layout faster than g.T xa
            grad_b = (xa.t() @ g).t().mul_(ctx.scale)
        return grad_x, grad_a, grad_b, None, None, None


class _DenseLinear:
    """The frozen matmuls of a plain `torch.nn.Linear` weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x @ self.weight.t() if bias is None else torch.addmm(bias, x, self.weight.t())

    def grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.weight


def fuse_lora(model: Any) -> int:
    """Give every PEFT LoRA linear layer of `model` the fused forward; returns how many there are.

    The fused path runs when the base layer has frozen matmuls in the input's dtype: a plain
    `torch.nn.Linear`, or a layer with a `frozen_linear(dtype)` method (4-bit layers routed through
    `edgetune.train.fourbit`). Otherwise, and whenever PEFT's own features are in use, the layer
    runs PEFT's forward.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and _has_frozen(m.base_layer)]
    for module in layers:
        module.forward = _forward(module, module.forward)
    return len(layers)


def _has_frozen(base: Any) -> bool:
    return type(base) is torch.nn.Linear or hasattr(base, "frozen_linear")


def _frozen(base: Any, dtype: torch.dtype) -> Any:
    """`base`'s frozen matmuls in `dtype` (`forward(x, bias)`, `grad_input(grad)`), or None."""
    if base.weight.requires_grad:
        return None
    if hasattr(base, "frozen_linear"):
        return base.frozen_linear(dtype)
    return _DenseLinear(base.weight) if base.weight.dtype == dtype else None


def _forward(module: Any, peft_forward: Callable) -> Callable:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else _single_plain_adapter(module)
        if adapter is None:
            return peft_forward(x, *args, **kwargs)
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        bias = module.base_layer.bias
        frozen = _frozen(module.base_layer, x.dtype)
        if (frozen is None or a.dtype != x.dtype or b.dtype != x.dtype
                or (bias is not None and (bias.requires_grad or bias.dtype != x.dtype))):
            return peft_forward(x, *args, **kwargs)
        return _LoraLinear.apply(x, a, b, frozen, bias, module.scaling[adapter])

    return forward


def _single_plain_adapter(module: Any) -> str | None:
    """The one active vanilla LoRA adapter without dropout, or None when PEFT's forward is needed."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    if (adapter not in module.lora_A or adapter in getattr(module, "lora_variant", {})
            or not isinstance(module.lora_dropout[adapter], torch.nn.Identity)):
        return None
    return adapter
