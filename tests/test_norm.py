"""The fused RMSNorm (edgetune.train.norm) against the models' own norm layers."""

import pytest
import torch
from test_lora import _loss_and_grads, assert_same_without_the_fused_forward

from edgetune.train.model import add_lora, load_base
from edgetune.train.norm import _RMSNorm, fuse_norms


def _norms(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3 also norms queries and keys per head
def test_fused_norms_match_the_models_own(tiny_factory, arch):
    model = add_lora(load_base(tiny_factory(arch), torch.float32, "cpu"), 4, 8.0, 0.0,
                     "all-linear", 0, False)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "norm" in name:  # not all ones, so a wrong use of the weight shows
                p.uniform_(0.5, 1.5)
    norms = _norms(model)
    assert norms and all("_forward.<locals>" in m.forward.__qualname__ for m in norms)
    ids = torch.randint(0, 200, (2, 12))
    calls = []
    real = _RMSNorm.apply
    _RMSNorm.apply = lambda *args: calls.append(1) or real(*args)
    try:
        loss, grads = _loss_and_grads(model, ids)
    finally:
        _RMSNorm.apply = real
    assert len(calls) == len(norms)
    assert_same_without_the_fused_forward(model, ids, norms, loss, grads)


def test_gemma_style_offset_and_other_norms():
    """(1 + weight) norms are fused with the offset; a norm of another formula keeps its forward."""

    class GemmaLikeRMSNorm(torch.nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.eps = 1e-6
            self.weight = torch.nn.Parameter(torch.randn(dim) * 0.1, requires_grad=False)

        def forward(self, x):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return x * (1.0 + self.weight)

    class MeanCentredRMSNorm(GemmaLikeRMSNorm):
        def forward(self, x):
            return super().forward(x - x.mean(-1, keepdim=True))

    model = torch.nn.Sequential(GemmaLikeRMSNorm(32), MeanCentredRMSNorm(32))
    expected_input = torch.randn(5, 32, requires_grad=True)
    x = expected_input.detach().clone().requires_grad_()
    expected = model(expected_input)
    expected.square().sum().backward()
    assert fuse_norms(model) == 1
    assert "_forward.<locals>" in model[0].forward.__qualname__
    assert "_forward.<locals>" not in model[1].forward.__qualname__
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_input.grad, rtol=1e-4, atol=1e-6)
