"""Held-out accuracy by generation: greedy answers compared with the reference by exact match."""

from typing import Any

from edgetune.records import prompt_messages, to_messages
from edgetune.train.data import render_ids


def _reference(record: dict, fmt: str) -> str:
    return to_messages(record, fmt)[-1]["content"]


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int = 24,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding; prompts are tokenized as in
    training (`render_ids`)."""
    import torch

    ids = [render_ids(tokenizer, p, generation_prompt=True) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    model.eval()
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        enc = {"input_ids": input_ids.to(model.device), "attention_mask": mask.to(model.device)}
        with torch.no_grad():
            new = _generate(model, enc, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad, eos_token_id=stop_ids(tokenizer))
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def stop_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a reply: the chat template's end-of-turn token (if a single token), then eos."""
    from edgetune.templates import TEMPLATES

    template, vocab = tokenizer.chat_template or "", tokenizer.get_vocab()
    ends = [t.end_of_turn for t in TEMPLATES.values() if t.end_of_turn]
    ids = [vocab[e] for e in ends if e in template and e in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def _generate(model: Any, enc: Any, **settings: Any) -> Any:
    """The generated tokens (prompt left out) of `model` for the left-padded batch `enc`."""
    from edgetune.train.prompts import learns_inputs

    if not learns_inputs(model):
        return model.generate(**enc, **settings)[:, enc["input_ids"].shape[1]:]
    return _generate_after_learned_inputs(model, enc, **settings)


def _generate_after_learned_inputs(model: Any, enc: Any, **settings: Any) -> Any:
    """Generation for prompt, P- and prefix tuning through the base model's own generate.

    PEFT's generate (0.21) looks for the attention cache under `past_key_values`, which transformers
    5.24 calls `cache`: finding none, it puts the virtual tokens in again before every new token, and
    from the second token on its answers are not the model's. Here the
    virtual tokens go in once, as training put them: embeddings before the text (the pads of a
    left-padded row sit between them and the text, masked), or the prefix as the cache generation
    starts from, which puts the text's positions after it.
    """
    import torch

    from edgetune.train.prompts import cache_argument

    config, base = model.active_peft_config, model.get_base_model()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    mask = torch.cat([mask.new_ones(len(ids), config.num_virtual_tokens), mask], dim=1)
    if config.peft_type == "PREFIX_TUNING":
        cache = {cache_argument(model): model.get_prompt(len(ids))}
        return base.generate(input_ids=ids, attention_mask=mask, **cache, **settings)[:, ids.shape[1]:]
    tokens = base.get_input_embeddings()(ids)
    prompt = model.get_prompt(batch_size=len(ids)).to(tokens.dtype)
    # From inputs_embeds alone, generate returns only the new tokens.
    return base.generate(inputs_embeds=torch.cat([prompt, tokens], dim=1), attention_mask=mask,
                         **settings)


def exact_match(model: Any, tokenizer: Any, records: list[dict], fmt: str,
                max_new_tokens: int = 24) -> tuple[float, list[str]]:
    """(share of records answered exactly, the answers)."""
    prompts = [prompt_messages(r, fmt) for r in records]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
    hits = sum(a == _reference(r, fmt).strip() for a, r in zip(answers, records))
    return hits / len(records), answers
