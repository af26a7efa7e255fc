"""4-bit base layers on the CPU, dequantized into one reused buffer.

bitsandbytes' CPU path dequantizes a 4-bit weight into a new tensor for every matmul, forward and
backward (and again for the recomputed forward under gradient checkpointing). Each new tensor of a
few MiB or more is fresh memory: a 2048 x 8192 weight measured 33.7 ms to dequantize that way
against 5.8 ms into a buffer already touched, beside a 72 ms matmul for 256 tokens. The freed
temporaries also scatter glibc's heap: on a Llama-3.2-1B shape the heap grew by ~35 MB per layer
through a checkpointed forward while ~40 MB was live.

Here every 4-bit layer of a model dequantizes into one buffer, as large as its largest weight and
reused by each matmul in turn, through bitsandbytes' own CPU kernel (the same values, bit for bit).
"""

import ctypes
from typing import Any

import torch
import torch.nn.functional as F


class Workspace:
    """One flat buffer per compute dtype that a model's 4-bit layers dequantize into, one at a time."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def dequantize(self, weight: Any, dtype: torch.dtype) -> torch.Tensor:
        """`weight` (a bnb Params4bit) as a dense (out, in) tensor; valid until the next call."""
        state = weight.quant_state
        rows, cols = state.shape
        kernel = _kernel(state.quant_type, dtype)
        # bitsandbytes itself avoids its CPU kernel for odd widths and blocks of 2048 or more.
        if kernel is None or cols % 2 or state.blocksize >= 2048 or weight.device.type != "cpu":
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(weight, state).to(dtype)
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = self.buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
        out = buffer[:rows * cols].view(rows, cols)
        packed, absmax = weight.data.view(torch.uint8), _absmax(state)  # alive through the call
        kernel(_ptr(packed), _ptr(absmax), _ptr(out),
               ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols))
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


class _Matmul4bit(torch.autograd.Function):
    """x @ dequantize(weight).T (+ bias) for a frozen 4-bit weight: the gradient is for x only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, workspace: Workspace) -> torch.Tensor:
        ctx.weight, ctx.workspace = weight, workspace
        return F.linear(x, workspace.dequantize(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return grad @ ctx.workspace.dequantize(ctx.weight, grad.dtype), None, None, None


def use_workspace(model: Any) -> Workspace:
    """Route every bnb Linear4bit of `model` through one shared Workspace."""
    import bitsandbytes as bnb

    workspace = Workspace()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.forward = _forward(module, workspace)
            module.dense_weight = _dense_weight(module, workspace)
    return workspace


def _dense_weight(module: Any, workspace: Workspace) -> Any:
    """For edgetune.train.lora: the layer's weight as a dense tensor, when it computes in `dtype`."""
    def dense_weight(dtype: torch.dtype) -> Any:
        if module.compute_dtype not in (None, dtype):
            return None
        return lambda: workspace.dequantize(module.weight, dtype)

    return dense_weight


def _forward(module: Any, workspace: Workspace) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if module.compute_dtype is not None:
            x = x.to(module.compute_dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return _Matmul4bit.apply(x, module.weight, bias, workspace).to(dtype)

    return forward
