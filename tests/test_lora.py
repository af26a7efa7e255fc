"""The fused LoRA forward and backward (edgetune.train.lora) against PEFT's own."""

from contextlib import contextmanager

import pytest
import torch
from peft.tuners.lora import LoraLayer

from edgetune.train.lora import _LoraLinear
from edgetune.train.model import add_lora, load_base


def _lora_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _randomise_b(model, seed: int = 0) -> None:
    """PEFT starts lora_B at zero, which would hide an error in the low-rank term."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


@contextmanager
def _fused_calls():
    """A list that gets one entry per call of the fused layer's autograd function."""
    calls = []
    real = _LoraLinear.apply
    _LoraLinear.apply = lambda *args: calls.append(1) or real(*args)
    try:
        yield calls
    finally:
        _LoraLinear.apply = real


def _loss_and_grads(model, ids: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids).logits.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_without_the_fused_forward(model, ids: torch.Tensor, modules: list, loss, grads) -> None:
    """The loss and gradients of `model` (computed through the fused forwards set on `modules`) equal
    those of the modules' own forward: the class method the instance attribute shadows."""
    for m in modules:
        del m.forward
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch,quant,checkpointing", [
    ("llama", "none", False), ("qwen2", "none", False), ("llama", "nf4", False),
    ("llama", "none", True)])
def test_fused_lora_matches_peft(tiny_factory, arch, quant, checkpointing):
    """Same loss and adapter gradients as PEFT's forward, with biases, a 4-bit base and recomputation."""
    model = add_lora(load_base(tiny_factory(arch), torch.float32, "cpu", quant), 4, 8.0, 0.0,
                     "all-linear", 0, checkpointing)
    model.train()
    _randomise_b(model)
    layers = _lora_layers(model)
    assert layers and all("_forward.<locals>" in m.forward.__qualname__ for m in layers)
    if arch == "qwen2":
        assert any(m.base_layer.bias is not None for m in layers)
    ids = torch.randint(0, 200, (2, 12))
    with _fused_calls() as calls:
        loss, grads = _loss_and_grads(model, ids)
    assert len(calls) >= len(layers)  # every layer took the fused path
    assert_same_without_the_fused_forward(model, ids, layers, loss, grads)


def test_peft_features_fall_back_to_peft(tiny_model):
    """Dropout, a disabled adapter and a merged layer run PEFT's forward, with PEFT's results."""
    model = add_lora(load_base(tiny_model, torch.float32, "cpu"), 4, 8.0, 0.1, "all-linear", 0, False)
    _randomise_b(model)
    ids = torch.randint(0, 200, (1, 8))
    with _fused_calls() as calls:
        model.train()  # dropout active: PEFT's forward
        model(input_ids=ids)
        model.eval()  # dropout still configured: PEFT's forward
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with model.disable_adapter():
                disabled = model(input_ids=ids).logits
    assert calls == []
    base = load_base(tiny_model, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(disabled, base(input_ids=ids).logits)
    assert not torch.allclose(plain, disabled)


def test_int8_base_on_the_cpu_is_fused(tiny_model):
    """int8 layers on the CPU widen into the shared buffer (train/eightbit.py) and fuse, as the
    planner assumes; bf16 compute with fp32 adapters keeps PEFT's forward."""
    from edgetune.plan.memory import Setting, fused_lora

    model = add_lora(load_base(tiny_model, torch.float32, "cpu", "int8"), 4, 8.0, 0.0, "all-linear", 0,
                     False)
    with _fused_calls() as calls:
        model(input_ids=torch.randint(0, 200, (1, 8)))
    assert len(calls) == 2 * 7 and fused_lora(Setting(quant="int8", dtype="fp32"))
    assert fused_lora(Setting(quant="nf4", dtype="fp32")) and fused_lora(Setting(dtype="fp32"))
    assert not fused_lora(Setting(quant="int8", dtype="fp32", device="cuda"))
    assert not fused_lora(Setting(quant="int8", dtype="bf16"))
