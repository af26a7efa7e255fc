"""QLoRA: NF4 base weights with double quantization, 8-bit optimizer states, on the CPU."""

import bitsandbytes as bnb
import pytest
import torch

from edgetune.records import read_jsonl
from edgetune.train.command import train
from edgetune.train.config import TrainConfig
from edgetune.train.data import Batches, encode
from edgetune.train.loss import causal_lm_loss
from edgetune.train.model import add_lora, load_base
from edgetune.train.optim import make_optimizer


def qlora_model(tiny_model, double_quant=True):
    return add_lora(load_base(tiny_model, torch.float32, "cpu", "nf4", double_quant), 8, 16, 0.0,
                    "all-linear", 0, False)


def test_base_linears_are_nf4_with_double_quant(tiny_model):
    model = qlora_model(tiny_model)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down in each of 2 layers
    state = linears[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested: the block scales are quantized
    assert linears[0].weight.dtype == torch.uint8
    plain = qlora_model(tiny_model, double_quant=False)
    assert not next(m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.quant_state.nested
    # the output layer and embeddings stay in the compute dtype
    head = model.get_base_model().lm_head
    assert not isinstance(head, bnb.nn.Linear4bit) and head.weight.dtype == torch.float32


def test_adamw8bit_keeps_uint8_state_even_for_small_lora_matrices(tiny_model, alpaca_file):
    from transformers import AutoTokenizer

    model = qlora_model(tiny_model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert max(p.numel() for p in params) < 4096  # under bnb's default min_8bit_size
    optimizer = make_optimizer("adamw8bit", params, 1e-3, 0.0, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fmt, records = read_jsonl(alpaca_file)
    loss, n = causal_lm_loss(model, Batches(encode(tokenizer, fmt, records), 4, 0, 0).next())
    (loss / n).backward()
    optimizer.step()
    states = [optimizer.state[p] for p in params]
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)


def test_paged_optimizer_falls_back_on_cpu(capsys):
    optimizer = make_optimizer("paged_adamw8bit", [torch.nn.Parameter(torch.zeros(4, 4))], 1e-3,
                               0.0, "cpu")
    assert type(optimizer) is bnb.optim.AdamW8bit
    assert "paged optimizers need CUDA" in capsys.readouterr().out


def test_eval_pass_does_not_stop_learning(tiny_model, alpaca_file):
    """bnb may repack 4-bit weights for inference in an eval pass; gradients must survive it."""
    from transformers import AutoTokenizer

    model = qlora_model(tiny_model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fmt, records = read_jsonl(alpaca_file)
    batch = Batches(encode(tokenizer, fmt, records), 4, 0, 0).next()
    first_b = next(p for n, p in model.named_parameters() if "layers.0" in n and "lora_B" in n)

    def grad_norm() -> float:
        model.train()
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        value = first_b.grad.norm().item()
        model.zero_grad()
        return value

    before = grad_norm()
    model.eval()
    with torch.no_grad():
        causal_lm_loss(model, batch)
    assert all(not m.support_avx512bf16_for_cpu
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert before > 1e-4
    assert grad_norm() == pytest.approx(before, rel=1e-5)


def test_qlora_run_trains_and_resumes(tiny_model, alpaca_file, tmp_path):
    settings = dict(model=str(tiny_model), data=str(alpaca_file), dtype="fp32", steps=6,
                    batch_size=4, seq_len=64, lr=1e-2, rank=8, quant="nf4", optim="adamw8bit",
                    eval_every=3, save_every=3, progress=False)
    whole = train(TrainConfig(output=str(tmp_path / "whole"), **settings))

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    assert train(TrainConfig(output=str(tmp_path / "cut"), **settings), stop).interrupted
    resumed = train(TrainConfig(output=str(tmp_path / "cut"), resume=True, progress=False))
    assert whole.history[-1]["loss"] < whole.history[0]["loss"]
    assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_qlora_on_cuda_with_paged_optimizer(tiny_model, alpaca_file, tmp_path):
    summary = train(TrainConfig(model=str(tiny_model), data=str(alpaca_file), device="cuda",
                                output=str(tmp_path / "run"), steps=4, batch_size=4, seq_len=64,
                                rank=8, quant="nf4", optim="paged_adamw8bit", progress=False))
    assert summary.steps == 4 and summary.history[-1]["loss"] < summary.history[0]["loss"]


@pytest.fixture(scope="module")
def bf16_tied_model(tiny_factory, tmp_path_factory):
    """The tiny llama with tied embeddings, saved in bf16 as most checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_factory("llama", tie=True)
    out = tmp_path_factory.mktemp("bf16") / "llama"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def test_bf16_embeddings_stay_narrow_and_compute_in_fp32(bf16_tied_model, alpaca_file, monkeypatch):
    from conftest import reference_loss
    from transformers import AutoTokenizer

    from edgetune.train import loss as loss_lib

    monkeypatch.setattr(loss_lib, "WIDEN_ELEMENTS", 64 * 50)  # 50 of 300 vocab rows a block
    model = add_lora(load_base(bf16_tied_model, torch.float32, "cpu", "nf4"), 8, 16, 0.0,
                     "all-linear", 0, False)
    causal_lm = model.get_base_model()
    head = causal_lm.lm_head.weight
    assert head.dtype == torch.bfloat16 and head is causal_lm.model.embed_tokens.weight
    assert causal_lm.model.norm.weight.dtype == torch.float32
    assert model.peft_config["default"].base_model_name_or_path == str(bf16_tied_model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    tokenizer = AutoTokenizer.from_pretrained(bf16_tied_model)
    fmt, records = read_jsonl(alpaca_file)
    batch = Batches(encode(tokenizer, fmt, records), 8, 0, tokenizer.pad_token_id).next()

    def loss_and_grads(loss_fn) -> list:
        loss, _ = loss_fn(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return [loss.detach(), *grads]

    narrow = loss_and_grads(causal_lm_loss)  # online softmax over 6 widened blocks
    full_logits = loss_and_grads(reference_loss)  # the output layer widened block by block
    head.data = head.data.float()  # the same values, stored wide: one block, nothing to widen
    wide = loss_and_grads(causal_lm_loss)
    for a, b, c in zip(narrow, full_logits, wide):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
        # F.cross_entropy's backward sums in another order: gradients of ~1e-3 differ by ~1e-6.
        torch.testing.assert_close(b, c, rtol=1e-4, atol=2e-6)


def test_quantized_load_never_maps_the_checkpoint(bf16_tied_model, monkeypatch):
    """Mapped checkpoint pages count in the resident set: a base that is converted is read with pread."""
    import transformers.modeling_utils as modeling_utils

    opened = []
    real = modeling_utils.safe_open

    def recording(*args, **kwargs):
        opened.append(kwargs.get("backend", "mmap"))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", recording)
    load_base(bf16_tied_model, torch.float32, "cpu", "nf4")
    assert opened == []
    load_base(bf16_tied_model, torch.bfloat16, "cpu")  # already in the compute dtype: used in place
    assert opened == ["mmap"]


@pytest.mark.parametrize("double_quant", [True, False])
def test_workspace_matmul_matches_bitsandbytes(tiny_model, double_quant):
    """Each 4-bit layer, dequantized into the shared buffer, computes what bnb's matmul does."""
    base = load_base(tiny_model, torch.float32, "cpu", "nf4", double_quant)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    torch.manual_seed(0)
    for layer in layers * 2:  # the buffer is reused, and grows, across layers of each shape
        x = torch.randn(5, layer.in_features, requires_grad=True)
        out = layer(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        x_ref = x.detach().clone().requires_grad_()
        ref = bnb.matmul_4bit(x_ref, layer.weight.t(), quant_state=layer.weight.quant_state)
        (grad_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)


def dequantized_reference(weight) -> torch.Tensor:
    """bitsandbytes' pure-torch dequantization: quantization blocks run on across rows, as the
    quantizer made them, whatever the width."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    from edgetune.train.fourbit import _absmax

    state = weight.quant_state
    packed = weight.data.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(packed, _absmax(state), _get_4bit_code(state.quant_type, packed.device),
                                    state.blocksize, state.shape, torch.float32)


@pytest.mark.parametrize("out_features,in_features,bias", [(200, 96, True), (64, 576, False)])
def test_workspace_blocks_of_rows_match_the_whole_weight(out_features, in_features, bias):
    """A buffer smaller than the weight: each block of rows starts on a quantization block, and the
    output columns and input-gradient sums it makes equal one matmul with the whole weight. A width
    that is not a multiple of the quantization block (96 against 64) keeps its blocks across rows."""
    from edgetune.train.fourbit import Workspace

    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu").requires_grad_(False)  # quantizes; frozen, as load_base leaves it
    whole = dequantized_reference(layer.weight)
    # Weights within +-1/sqrt(in): NF4's error is at most half its widest code gap (0.139) times the
    # block's absmax, plus a little for the 8-bit absmax of double quantization. Reading the blocks
    # row by row (bitsandbytes' CPU call at width 96) breaks this bound.
    assert (whole - dense.weight).abs().max() < 0.16 / in_features**0.5
    workspace = Workspace(elements=3000)  # a few rows per block, not a multiple of 64 elements
    blocks = [(first, rows.clone()) for first, rows in workspace.blocks(layer.weight, torch.float32)]
    assert len(blocks) > 3 and all(first * in_features % 64 == 0 for first, _ in blocks)
    assert sum(len(rows) for _, rows in blocks) == out_features
    torch.testing.assert_close(torch.cat([rows for _, rows in blocks]), whole, rtol=0, atol=0)
    x, grad = torch.randn(7, in_features), torch.randn(7, out_features)
    torch.testing.assert_close(workspace.linear(x, layer.weight, layer.bias),
                               torch.nn.functional.linear(x, whole, layer.bias), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(workspace.grad_input(grad, layer.weight), grad @ whole, rtol=1e-5, atol=1e-5)
