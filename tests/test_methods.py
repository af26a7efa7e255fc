"""Every --method on tiny models: parameter counts, the loss path of the methods that learn inputs,
AdaLoRA's regulariser, and a quantized base."""

import pytest
import torch
from test_packing import examples

from edgetune.methods import METHODS
from edgetune.train.adapters import hooks, peft_config
from edgetune.train.config import TrainConfig
from edgetune.train.data import collate, pack
from edgetune.train.loss import causal_lm_loss
from edgetune.train.model import add_adapter, load_base, parameter_counts

# Tiny llama: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads (32 wide), 2 layers.
LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # (in, out)
EXPECTED_TRAINABLE = {
    "lora": 2 * sum(2 * (i + o) for i, o in LINEARS),  # rank 2
    "rslora": 2 * sum(2 * (i + o) for i, o in LINEARS),
    "dora": 2 * sum(2 * (i + o) + o for i, o in LINEARS),  # + one magnitude per output row
    "adalora": 2 * sum(4 * (i + o + 1) for i, o in LINEARS),  # initial rank 4: A, B and E
    "ia3": 2 * (32 + 32 + 128),  # k and v outputs, down_proj's input
    "prompt": 5 * 64,  # 5 virtual tokens
    "ptuning": 5 * 64 + 3 * (64 * 64 + 64),  # + the encoder: three 64-wide linear layers
    "prefix": 5 * 2 * 2 * 32,  # a key and a value (2 kv heads of 16) per layer and virtual token
}


def build(tiny_model, method: str, quant: str = "none", seed: int = 1):
    """`method` on the tiny model as `edgetune train` builds it, with random adapter values."""
    config = TrainConfig(data="unused.jsonl", method=method, rank=2, virtual_tokens=5,
                         **({"init_rank": 4} if method == "adalora" else {}))
    model = add_adapter(load_base(tiny_model, torch.float32, "cpu", quant), peft_config(config, 10), 0,
                        False, fuse=METHODS[method].fused, method_name=method)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p * (1 + 0.2 * torch.randn_like(p)) if "ia3" in name or "magnitude" in name
                        else torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("method", sorted(EXPECTED_TRAINABLE))
def test_trainable_parameters(method, tiny_model):
    assert parameter_counts(build(tiny_model, method))[0] == EXPECTED_TRAINABLE[method]


def _loss_and_grads(model, loss_fn) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_learned_inputs_train_as_peft_forward_does(method, tiny_model):
    """The trainer's loss (virtual tokens built in edgetune.train.prompts, chunked loss) equals PEFT's
    own forward with labels, loss and gradients, on a right-padded batch."""
    model = build(tiny_model, method)
    model.train()
    batch = collate(examples([17, 40, 9, 33]), pad_id=0)

    def ours():
        loss, n = causal_lm_loss(model, batch)
        return loss / n

    def peft():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    for mine, reference in zip(_loss_and_grads(model, ours), _loss_and_grads(model, peft)):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_soft_prompt_before_each_packed_example(method, tiny_model):
    """Packed with the virtual tokens before each example and attention kept inside each one, the
    loss and gradients are those of the padded batch."""
    from edgetune.train.attention import use_segment_attention

    model = build(tiny_model, method)
    batch = examples([17, 40, 9, 33])
    padded = _loss_and_grads(model, lambda: causal_lm_loss(model, collate(batch, 0))[0])
    use_segment_attention(model)
    packed = _loss_and_grads(model, lambda: causal_lm_loss(model, pack(batch))[0])
    for mine, reference in zip(packed, padded):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_prefix_tuning_does_not_pack(tiny_model):
    model = build(tiny_model, "prefix")
    assert not hooks(model, "prefix").packs and hooks(model, "prompt").packs
    with pytest.raises(ValueError, match="padded batches"):
        causal_lm_loss(model, pack(examples([9, 12])))


def test_adalora_regulariser_is_peft_s(tiny_model):
    """PEFT adds AdaLoRA's orthogonal regularisation in its forward; the loop adds the same term."""
    model = build(tiny_model, "adalora")
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        with_term = model(input_ids=ids, labels=ids).loss
        plain = model.base_model.model(input_ids=ids, labels=ids).loss
        term = hooks(model, "adalora").extra_loss()
    assert float(term) > 0
    torch.testing.assert_close(term, with_term - plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dora", "rslora", "adalora", "ia3", "prompt", "ptuning", "prefix"])
def test_every_method_trains_over_a_4bit_base(method, tiny_model):
    """QLoRA-style: PEFT's 4-bit layers (or, for learned inputs, the untouched 4-bit base) pass
    gradients to every adapter parameter."""
    import bitsandbytes as bnb

    model = build(tiny_model, method, quant="nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model.train()
    batch = collate(examples([17, 9]), 0) if method == "prefix" else pack(examples([17, 9]))
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_generation_after_learned_inputs(method, tiny_model):
    """Batched greedy answers (left-padded) equal those of the training-time forward run again for
    every new token, one prompt at a time."""
    from transformers import AutoTokenizer

    from edgetune.train.evaluate import generate_answers
    from edgetune.train.prompts import decoder_inputs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = build(tiny_model, method).eval()
    prompts = [[{"role": "user", "content": "Say 0 twice."}],
               [{"role": "user", "content": "What is the capital of France? Say it."}]]
    expected = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                inputs, _ = decoder_inputs(model, {"input_ids": ids, "labels": ids,
                                                   "attention_mask": torch.ones_like(ids)})
                hidden = model.get_base_model().model(**inputs, use_cache=False).last_hidden_state
                new.append(int(model.get_base_model().lm_head(hidden[0, -1]).argmax()))
                ids = torch.cat([ids, torch.tensor([new[-1:]])], dim=1)
        expected.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    assert generate_answers(model, tokenizer, prompts, 6, batch_size=2) == expected


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("qwen2", False), ("llama", True)])
def test_fused_dora_matches_peft(arch, checkpointing, tiny_factory):
    """Same loss and gradients (A, B and the magnitude) as PEFT's DoRA forward, with q/k/v biases and
    recomputation; the fused layers are the ones that ran."""
    from peft.tuners.lora import LoraLayer

    from edgetune.train import dora

    config = TrainConfig(data="unused.jsonl", method="dora", rank=2)
    model = add_adapter(load_base(tiny_factory(arch), torch.float32, "cpu"), peft_config(config, 10), 0,
                        checkpointing, fuse=True, method_name="dora")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p * (1 + 0.2 * torch.randn_like(p)) if "magnitude" in name else torch.randn_like(p) * 0.1)
    model.train()
    ids = torch.randint(0, 200, (2, 12))

    def loss_fn():
        return model(input_ids=ids).logits.square().mean()

    calls, real = [], dora._DoraLinear.apply
    dora._DoraLinear.apply = lambda *args: calls.append(1) or real(*args)
    try:
        fused = _loss_and_grads(model, loss_fn)
    finally:
        dora._DoraLinear.apply = real
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(calls) >= len(layers) == 14
    for m in layers:  # PEFT's own forward, the class method the instance attribute shadows
        del m.forward
    for mine, reference in zip(fused, _loss_and_grads(model, loss_fn)):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
