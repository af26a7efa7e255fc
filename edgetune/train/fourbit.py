"""4-bit base layers on the CPU, dequantized into one reused buffer.

bitsandbytes' CPU path dequantizes a 4-bit weight into a new tensor for every matmul, forward and
backward (and again for the recomputed forward under gradient checkpointing). Each new tensor of a
few MiB or more is fresh memory, slower to write than the matmul that follows is to read, and the
freed temporaries scatter glibc's heap (docs/qlora.md has the measurements).

Here every 4-bit layer of a model dequantizes into one buffer, reused by each matmul in turn,
through bitsandbytes' own CPU kernel (the same values, bit for bit). A weight larger than the buffer
is taken a block of rows at a time: the forward pass writes each block's columns of the output, the
backward pass adds each block's share of the input gradient. The buffer then stays resident for the
whole run instead of the largest weight, and it fits in the cache that the matmul reads it back from.
"""

import ctypes
import math
from collections.abc import Iterator
from typing import Any

import torch

from edgetune.constants import DEQUANT_BUFFER_ELEMENTS


class Workspace:
    """One flat buffer per compute dtype that a model's 4-bit layers dequantize into, one at a time."""

    def __init__(self, elements: int = DEQUANT_BUFFER_ELEMENTS) -> None:
        self.elements = elements
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def blocks(self, weight: Any, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, dense rows) of `weight` (a bnb Params4bit) in `dtype`, a block at a time.

        Each block is valid until the next one is asked for.
        """
        state = weight.quant_state
        rows, cols = state.shape
        kernel = _kernel(state.quant_type, dtype)
        # bitsandbytes itself avoids its CPU kernel for odd widths and blocks of 2048 or more.
        if kernel is None or cols % 2 or state.blocksize >= 2048 or weight.device.type != "cpu":
            import bitsandbytes.functional as bnbf

            yield 0, bnbf.dequantize_4bit(weight, state).to(dtype)
            return
        # Blocks of equal size, each starting on a quantization block (a multiple of `step` rows).
        step = state.blocksize // math.gcd(cols, state.blocksize)
        most = max(step, self.elements // cols // step * step)
        count = math.ceil(rows / most)
        block_rows = min(rows, math.ceil(math.ceil(rows / count) / step) * step)
        buffer = self.buffer(dtype, block_rows * cols)
        packed, absmax = weight.data.view(torch.uint8).reshape(-1), _absmax(state)  # alive throughout
        # The kernel restarts its quantization blocks at each row it is given, while the weights were
        # quantized in blocks that run on across rows: hand it rows that a whole number of blocks
        # fills (bitsandbytes' own call, one row per weight row, misreads widths that are not).
        row = math.lcm(cols, state.blocksize)
        for first in range(0, rows, block_rows):
            n = min(block_rows, rows - first)
            out = buffer[:n * cols].view(n, cols)
            element, count = first * cols, n * cols
            m, width = (count // row, row) if count % row == 0 else (1, count)
            kernel(_ptr(packed[element // 2:]), _ptr(absmax[element // state.blocksize:]), _ptr(out),
                   ctypes.c_longlong(state.blocksize), ctypes.c_longlong(m), ctypes.c_longlong(width))
            yield first, out

    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T (+ bias) for 2-d `x`, one block of W's rows (the output's columns) at a time."""
        return linear_blocks(x, self.blocks(weight, x.dtype), weight.quant_state.shape[0], bias)

    def grad_input(self, grad: torch.Tensor, weight: Any) -> torch.Tensor:
        """grad @ W for 2-d `grad`, summed over blocks of W's rows."""
        return grad_input_blocks(grad, self.blocks(weight, grad.dtype))

    def buffer(self, dtype: torch.dtype, elements: int) -> torch.Tensor:
        """The shared buffer for `dtype`, grown to at least `elements`."""
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < elements:
            buffer = self.buffers[dtype] = torch.empty(elements, dtype=dtype)
        return buffer


def linear_blocks(x: torch.Tensor, blocks: Iterator[tuple[int, torch.Tensor]], rows: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias) for a W of `rows` rows given as (first row, dense rows) blocks."""
    out = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    for first, w in blocks:
        columns = out[:, first:first + len(w)]
        if bias is None:
            torch.mm(x, w.t(), out=columns)
        else:
            torch.addmm(bias[first:first + len(w)], x, w.t(), out=columns)
    return out


def grad_input_blocks(grad: torch.Tensor, blocks: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """grad @ W for a W given as (first row, dense rows) blocks."""
    out = None
    for first, w in blocks:
        part = grad[:, first:first + len(w)]
        out = part @ w if out is None else out.addmm_(part, w)
    return out


def _absmax(state: Any) -> torch.Tensor:
    """Per-block fp32 scales, decoding the 8-bit ones of double quantization."""
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset


def _kernel(quant_type: str, dtype: torch.dtype) -> Any:
    """bitsandbytes' CPU dequantization routine for this format and output dtype, if it has one."""
    from bitsandbytes.cextension import lib

    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None) if suffix else None


def _ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    assert tensor.is_contiguous()
    return ctypes.c_void_p(tensor.data_ptr())


class FrozenLinear:
    """A frozen 4-bit layer's matmuls through the workspace: forward, and input gradient.

    Its own forward (`FrozenMatmul`) and edgetune.train.lora's fused LoRA layers both build on them.
    """

    def __init__(self, module: Any, workspace: Workspace) -> None:
        self.module, self.workspace = module, workspace

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.workspace.linear(x, self.module.weight, bias)

    def grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        return self.workspace.grad_input(grad, self.module.weight)


class FrozenMatmul(torch.autograd.Function):
    """x @ W.T (+ bias) for a frozen quantized W (`frozen`'s matmuls): the gradient is for x only, and
    nothing is saved but `frozen` itself."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, frozen: FrozenLinear, bias: Any) -> torch.Tensor:
        ctx.frozen, ctx.shape = frozen, x.shape
        out = frozen.forward(x.reshape(-1, x.shape[-1]), bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = ctx.frozen.grad_input(grad.reshape(-1, grad.shape[-1]))
        return grad_x.view(ctx.shape), None, None


def use_workspace(model: Any) -> Workspace:
    """Route every bnb Linear4bit of `model` through one shared Workspace."""
    import bitsandbytes as bnb

    workspace = Workspace()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            frozen = FrozenLinear(module, workspace)
            module.forward = _forward(module, frozen)
            module.frozen_linear = _frozen_linear(module, frozen)
    return workspace


def _frozen_linear(module: Any, frozen: FrozenLinear) -> Any:
    """For edgetune.train.lora: the layer's matmuls in `dtype`, or None if it computes in another."""
    def frozen_linear(dtype: torch.dtype) -> FrozenLinear | None:
        return frozen if module.compute_dtype in (None, dtype) else None

    return frozen_linear


def _forward(module: Any, frozen: FrozenLinear) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if module.compute_dtype is not None:
            x = x.to(module.compute_dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return FrozenMatmul.apply(x, frozen, bias).to(dtype)

    return forward
