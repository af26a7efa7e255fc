"""Held-out accuracy by generation: greedy answers compared with the reference by exact match."""

from typing import Any

from edgetune.records import prompt_messages, to_messages


def _reference(record: dict, fmt: str) -> str:
    return to_messages(record, fmt)[-1]["content"]


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int = 24,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding."""
    import torch

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def exact_match(model: Any, tokenizer: Any, records: list[dict], fmt: str,
                max_new_tokens: int = 24) -> tuple[float, list[str]]:
    """(share of records answered exactly, the answers)."""
    prompts = [prompt_messages(r, fmt) for r in records]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
    hits = sum(a == _reference(r, fmt).strip() for a, r in zip(answers, records))
    return hits / len(records), answers
