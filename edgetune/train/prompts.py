"""Decoder inputs for the methods that learn inputs: prompt tuning and P-tuning (virtual token
embeddings before the text) and prefix tuning (keys and values before every attention layer's own).

PEFT prepends them in its own forward, which returns the whole batch x sequence x vocabulary logits;
the trainer's loss (edgetune.train.loss) calls the decoder directly, so the same inputs are built
here, as PEFT's forward builds them: virtual positions carry no label, a padded batch's attention mask
gains ones for them, and the text's positions start after them.

A packed row (edgetune.train.data.pack) gets the virtual tokens before each of its examples, with
positions restarting at 0 for each, so every example sees what it would see alone. Prefix tuning is
trained on padded batches: its keys and values sit in the attention cache of the whole row, where the
per-example attention of packed rows (edgetune.train.attention) cannot give each example its own copy.
"""

import inspect
from typing import Any

import torch

from edgetune.constants import IGNORE
from edgetune.train.data import SEGMENTS


def learns_inputs(model: Any) -> bool:
    """Whether `model` is a PEFT model of a prompt-learning method."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.is_prompt_learning


def decoder_inputs(model: Any, batch: dict) -> tuple[dict, torch.Tensor]:
    """(keyword arguments for the decoder, labels aligned with its positions) for a PEFT prompt-learning
    model's batch."""
    config = model.active_peft_config
    if config.peft_type == "PREFIX_TUNING":
        return _prefix(model, batch, config.num_virtual_tokens)
    if "attention_mask" in batch:
        return _padded(model, batch, config.num_virtual_tokens)
    return _packed(model, batch, config.num_virtual_tokens)


def _embed(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings of `ids`, the virtual token embeddings [n, hidden] in their dtype)."""
    tokens = model.get_base_model().get_input_embeddings()(ids)
    return tokens, model.get_prompt(batch_size=1)[0].to(tokens.dtype)


def _padded(model: Any, batch: dict, n: int) -> tuple[dict, torch.Tensor]:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = ids.shape[0]
    tokens, prompt = _embed(model, ids)
    embeds = torch.cat([prompt.expand(rows, -1, -1), tokens], dim=1)
    mask = torch.cat([mask.new_ones(rows, n), mask], dim=1)
    labels = torch.cat([labels.new_full((rows, n), IGNORE), labels], dim=1)
    return {"inputs_embeds": embeds, "attention_mask": mask}, labels


def _packed(model: Any, batch: dict, n: int) -> tuple[dict, torch.Tensor]:
    """The virtual tokens before each example of a packed row, positions restarting with them."""
    tokens, prompt = _embed(model, batch["input_ids"])
    labels, bounds = batch["labels"][0], batch[SEGMENTS]
    parts, label_parts, positions, new_bounds = [], [], [], [0]
    for start, end in zip(bounds[:-1], bounds[1:]):
        parts += [prompt, tokens[0, start:end]]
        label_parts += [labels.new_full((n,), IGNORE), labels[start:end]]
        positions.append(torch.arange(n + end - start, device=labels.device))
        new_bounds.append(new_bounds[-1] + n + end - start)
    inputs = {"inputs_embeds": torch.cat(parts)[None], "position_ids": torch.cat(positions)[None],
              SEGMENTS: tuple(new_bounds)}
    return inputs, torch.cat(label_parts)[None]


def _prefix(model: Any, batch: dict, n: int) -> tuple[dict, torch.Tensor]:
    if "attention_mask" not in batch:
        raise ValueError("prefix tuning trains on padded batches, not packed rows")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = model.get_prompt(ids.shape[0], max_cache_len=ids.shape[1] + n)
    mask = torch.cat([mask.new_ones(ids.shape[0], n), mask], dim=1)
    return {"input_ids": ids, "attention_mask": mask, cache_argument(model): cache}, batch["labels"]


def cache_argument(model: Any) -> str:
    """The decoder's name for its attention cache: `cache` since transformers 5.24, before that
    `past_key_values` (still accepted, with a deprecation warning on every call)."""
    decoder = model.get_base_model().model
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
