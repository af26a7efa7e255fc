"""8-bit (LLM.int8) base layers on the CPU, widened a block of rows at a time into a shared buffer.

In training, bitsandbytes' CPU path for an 8-bit layer (`MatMul8bitFp`) widens the whole int8 weight
to the compute dtype for each matmul, forward and backward, and keeps the layer's input as a plain
attribute of its autograd context. Gradient checkpointing's saved-tensor hooks never see that
attribute, so each checkpointed decoder layer kept the inputs of all its 8-bit matmuls until the
backward pass reached it: the memory that checkpointing is there to save (docs/planner.md).

Here each weight is widened with the same arithmetic (int8 times its row's scale / 127, so the
same values) into the buffer that 4-bit layers use (edgetune.train.fourbit), a block of rows at a
time, and only the input gradient is computed, so nothing but the layer itself is kept for the
backward pass. Outlier decomposition does not enter: bitsandbytes' CPU training path does not use
it either.
"""

from collections.abc import Iterator
from typing import Any

import torch

from edgetune.train.fourbit import FrozenMatmul, Workspace, grad_input_blocks, linear_blocks


class FrozenInt8:
    """A frozen 8-bit layer's matmuls through the workspace: forward, and input gradient."""

    def __init__(self, module: Any, workspace: Workspace) -> None:
        if module.weight.CB is not None:
            module.init_8bit_state()  # what its first forward would do: the scales move to .state
        self.module, self.workspace = module, workspace

    def blocks(self, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows widened to `dtype`) of the weight; each valid until the next."""
        weight, row_scale = self.module.weight.data, self.module.state.SCB
        rows, cols = weight.shape
        block_rows = max(1, min(rows, self.workspace.elements // cols))
        buffer = self.workspace.buffer(dtype, block_rows * cols)
        scale = row_scale.mul(1.0 / 127.0)  # bitsandbytes' own factor, for the same rounding
        for first in range(0, rows, block_rows):
            n = min(block_rows, rows - first)
            out = buffer[:n * cols].view(n, cols)
            torch.mul(weight[first:first + n], scale[first:first + n, None], out=out)
            yield first, out

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear_blocks(x, self.blocks(x.dtype), self.module.weight.shape[0], bias)

    def grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        return grad_input_blocks(grad, self.blocks(grad.dtype))


def use_workspace(model: Any) -> Workspace:
    """Route every bnb Linear8bitLt of `model` through one shared Workspace."""
    import bitsandbytes as bnb

    workspace = Workspace()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            frozen = FrozenInt8(module, workspace)
            module.forward = _forward(module, frozen)
            module.frozen_linear = lambda dtype, frozen=frozen: frozen  # any floating dtype
    return workspace


def _forward(module: Any, frozen: FrozenInt8) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return FrozenMatmul.apply(x, frozen, bias)

    return forward
