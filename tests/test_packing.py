import pytest
import torch

from edgetune.constants import IGNORE
from edgetune.train.data import SEGMENTS, Example, collate, n_tokens, pack
from edgetune.train.loss import causal_lm_loss


@pytest.fixture
def lora_model(tiny_model):
    from edgetune.train.model import add_lora, load_base

    model = add_lora(load_base(tiny_model, torch.float32, "cpu"), 8, 16, 0.0, "all-linear", 0, False)
    torch.manual_seed(1)
    for p in model.parameters():  # non-zero lora_B so the adapter changes the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        prompt = n // 3  # alpaca-like: the prompt carries no loss
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_pack_layout():
    batch = pack([Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [IGNORE, 9])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # 8 would be predicted from 7, across examples: its label is dropped, as unpacked it is never used
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch[SEGMENTS] == (0, 3, 5)
    assert n_tokens(batch) == 5 == n_tokens(collate([Example([5, 6, 7], [5, 6, 7]),
                                                     Example([8, 9], [IGNORE, 9])], 0))


def loss_and_grads(model, batch) -> list[torch.Tensor]:
    loss, n = causal_lm_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return [loss.detach(), torch.tensor(n)] + grads


@pytest.mark.parametrize("segment_attention,lengths", [
    (False, [17, 40, 9, 33]), (True, [17, 40, 9, 33]),
    (True, [16, 16, 16, 9, 16, 16])])  # runs of equal lengths go through SDPA as one batch
def test_packed_batch_trains_like_the_padded_batch(lora_model, segment_attention, lengths):
    from edgetune.train.attention import use_segment_attention

    batch = examples(lengths)
    padded = loss_and_grads(lora_model, collate(batch, pad_id=0))
    if segment_attention:
        use_segment_attention(lora_model)
    packed = loss_and_grads(lora_model, pack(batch))
    assert packed[1] == padded[1]  # the same label tokens
    for mine, reference in zip(packed, padded):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


def test_attention_stays_inside_each_packed_example(lora_model):
    from edgetune.train.attention import use_segment_attention

    use_segment_attention(lora_model)
    first, second = examples([12, 20], seed=2)
    other_first = examples([12], seed=3)[0]
    decoder = lora_model.get_base_model().model

    def hidden(pair: list[Example]) -> torch.Tensor:
        batch = pack(pair)
        with torch.no_grad():
            return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           **{SEGMENTS: batch[SEGMENTS]}).last_hidden_state[0]

    a, b = hidden([first, second]), hidden([other_first, second])
    assert not torch.allclose(a[:12], b[:12])
    torch.testing.assert_close(a[12:], b[12:], rtol=0, atol=1e-6)  # the second example sees no change


def test_segment_attention_leaves_padded_batches_and_generation_alone(lora_model, tiny_model):
    from transformers import AutoModelForCausalLM

    from edgetune.train.attention import use_segment_attention

    batch = collate(examples([15, 7]), pad_id=0)
    before = causal_lm_loss(lora_model, batch)[0].detach()
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora_model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    use_segment_attention(lora_model)
    torch.testing.assert_close(causal_lm_loss(lora_model, batch)[0].detach(), before)
    with torch.no_grad():
        assert torch.equal(lora_model.generate(input_ids=prompt, max_new_tokens=5,
                                               do_sample=False), expected)
    assert AutoModelForCausalLM.from_pretrained(tiny_model).config._attn_implementation != \
        "edgetune_segments"  # other models keep their own attention


def test_equal_length_examples_share_one_attention_call():
    from edgetune.train.attention import _equal_runs

    assert _equal_runs((0, 16, 32, 48, 57, 73, 89)) == [(0, 16, 3), (48, 9, 1), (57, 16, 2)]
    assert _equal_runs((0, 5)) == [(0, 5, 1)]
