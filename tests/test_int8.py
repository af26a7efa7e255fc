"""8-bit (LLM.int8) base layers on the CPU: bitsandbytes' values, nothing kept past checkpointing."""

import gc
import weakref

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.autograd._functions import MatMul8bitFp

from edgetune.train.eightbit import FrozenInt8
from edgetune.train.fourbit import Workspace
from edgetune.train.model import add_lora, load_base


def test_int8_layers_compute_what_bitsandbytes_trains_with(tiny_model):
    """Forward and input gradient equal bitsandbytes' CPU training matmul (MatMul8bitFp)."""
    base = load_base(tiny_model, torch.float32, "cpu", "int8")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(m.weight.dtype == torch.int8 for m in layers)
    torch.manual_seed(0)
    for layer in layers:
        x = torch.randn(5, layer.in_features, requires_grad=True)
        out = layer(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        x_ref = x.detach().clone().requires_grad_()
        ref = MatMul8bitFp.apply(x_ref, layer.weight, None, layer.bias, layer.state)
        (grad_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)


def test_int8_blocks_of_rows_match_the_whole_weight(tiny_model):
    """A buffer smaller than the weight: blocks of rows give one whole-weight matmul's results."""
    base = load_base(tiny_model, torch.float32, "cpu", "int8")
    layer = next(m for m in base.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    frozen = FrozenInt8(layer, Workspace(elements=5 * layer.in_features + 3))
    blocks = [(first, rows.clone()) for first, rows in frozen.blocks(torch.float32)]
    assert len(blocks) > 3 and sum(len(rows) for _, rows in blocks) == layer.out_features
    whole = layer.weight.data.float() * (layer.state.SCB / 127)[:, None]
    torch.testing.assert_close(torch.cat([rows for _, rows in blocks]), whole)
    x, grad = torch.randn(7, layer.in_features), torch.randn(7, layer.out_features)
    torch.testing.assert_close(frozen.forward(x, None), x @ whole.t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen.grad_input(grad), grad @ whole, rtol=1e-5, atol=1e-5)


def test_checkpointed_int8_layers_keep_no_inputs(tiny_model):
    """With checkpointing, a decoder layer's intermediate activations are gone once the forward pass
    is over (bitsandbytes' own 8-bit matmul kept every 8-bit layer's input until the backward)."""
    model = add_lora(load_base(tiny_model, torch.float32, "cpu", "int8"), 4, 8.0, 0.0, "all-linear", 0,
                     True)
    model.train()
    alive = []
    down = model.get_base_model().model.layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: alive.append(weakref.ref(args[0])))
    loss = model(input_ids=torch.randint(0, 200, (2, 16))).logits.float().square().mean()
    handle.remove()
    gc.collect()
    assert alive and alive[0]() is None
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def bf16_tied_model(tiny_factory, tmp_path_factory):
    """The tiny llama with tied embeddings, saved in bf16 as most checkpoints are."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "llama"
    AutoModelForCausalLM.from_pretrained(tiny_factory("llama", tie=True), dtype=torch.bfloat16).save_pretrained(out)
    return out


def test_int8_embeddings_stay_as_narrow_as_the_checkpoint(bf16_tied_model):
    """Read in the file's bf16 (as nf4 is), the embeddings stay bf16 beside fp32 compute."""
    base = load_base(bf16_tied_model, torch.float32, "cpu", "int8")
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.float32
