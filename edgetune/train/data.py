"""Training examples from JSONL records (edgetune.records): tokenized with the model's chat template,
truncated, split and batched.

Chat and alpaca records are rendered with the chat template and only the assistant's tokens carry
loss; text records carry loss on every token.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from edgetune.constants import IGNORE
from edgetune.errors import EdgetuneError
from edgetune.records import to_messages

SEGMENTS = "segment_bounds"  # packed batches: example boundaries (0, end_1, ..., end_n) in the row


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    # Distillation: the teacher's (top-k ids, top-k log-probs), numpy arrays [response tokens, k],
    # one row per label in labels[1:] (edgetune.distill).
    teacher: tuple | None = field(default=None, compare=False, repr=False)


def render_ids(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, starting with BOS where the
    tokenizer starts text with one.

    llama.cpp adds BOS to a rendered prompt when the GGUF says `add_bos_token` (Gemma, Llama; Gemma
    was pretrained with BOS starting every sequence), so a template without `{{ bos_token }}`
    (chatml, plain) is trained here the way it will run there.
    """
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if hasattr(ids, "keys"):  # BatchEncoding in transformers 5
        ids = ids["input_ids"]
    ids = list(ids)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and adds_bos(tokenizer):
        ids.insert(0, bos)
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with its BOS token."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def encode_chat(tokenizer: Any, messages: list[dict]) -> Example:
    """Token ids of a conversation with labels only on the assistant turns."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_ids(tokenizer, messages[:i], generation_prompt=True)
        through = render_ids(tokenizer, messages[: i + 1], generation_prompt=False)
        if through[: len(before)] != before or before[: len(input_ids)] != input_ids:
            raise EdgetuneError("the model's chat template does not render conversations as prefixes "
                                "of each other, so the response tokens cannot be located")
        labels += [IGNORE] * (len(before) - len(input_ids)) + through[len(before):]
        input_ids = through
    return Example(input_ids, labels)


def encode_text(tokenizer: Any, text: str) -> Example:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Example(ids, list(ids))


def encode(tokenizer: Any, fmt: str, records: list[dict]) -> list[Example]:
    """Tokenize records; chat and alpaca need the tokenizer's chat template."""
    if fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise EdgetuneError(f"the model's tokenizer has no chat template, needed for {fmt} records; "
                            "pass --template (chatml, gemma, llama3, plain or a .jinja file)")
    if fmt == "text":
        return [encode_text(tokenizer, r["text"]) for r in records]
    return [encode_chat(tokenizer, to_messages(r, fmt)) for r in records]


def fit_to_length(examples: list[Example], seq_len: int, source: str) -> list[Example]:
    """Truncate to `seq_len`; drop examples left without any token to learn from."""
    kept = [Example(e.input_ids[:seq_len], e.labels[:seq_len]) for e in examples]
    kept = [e for e in kept if any(label != IGNORE for label in e.labels[1:])]
    if not kept:
        shortest = min(len(e.input_ids) for e in examples)
        raise EdgetuneError(f"--seq-len {seq_len} is shorter than every example in {source} "
                            f"(the shortest needs {shortest + 1} tokens to keep a response token)")
    return kept


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split into (train, eval); eval gets round(n * fraction) examples."""
    import random

    n_eval = int(round(len(examples) * fraction))
    if n_eval == 0:
        return list(examples), []
    if n_eval >= len(examples):
        raise EdgetuneError(f"--eval-split {fraction} leaves no training examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


class Batches:
    """Seeded, resumable batching: epoch `e` visits examples in a permutation drawn from (seed, e).

    The position (epoch, index within the epoch) is all a checkpoint needs to continue exactly.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 packed: bool = True):
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.packed = packed
        self.epoch, self.index = 0, 0

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def _order(self) -> list[int]:
        import random

        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> dict:
        """The next batch, packed or padded; rolls over to a new epoch at the end of one."""
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        chosen = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        examples = [self.examples[i] for i in chosen]
        return pack(examples) if self.packed else collate(examples, self.pad_id)


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a list of examples to the longest one."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, **_teacher(examples)}


def _teacher(examples: list[Example]) -> dict:
    """The examples' teacher top-k stacked in the order the loss takes response tokens (example by
    example, left to right), when they carry one."""
    if examples[0].teacher is None:
        return {}
    import numpy as np
    import torch

    return {"top_ids": torch.from_numpy(np.concatenate([e.teacher[0] for e in examples])),
            "top_logprobs": torch.from_numpy(np.concatenate([e.teacher[1] for e in examples]))}


def pack(examples: list[Example]) -> dict:
    """The examples end to end in one row, without padding; same loss as `collate`'s padded batch.

    Padding a batch to its longest example wastes the work done on pad tokens (a third or more of
    the tokens of alpaca-style data, docs/performance.md). Position ids restart at 0 for each
    example, and the boundaries let attention stay inside each one (see `attention.py`). The first
    token of each example gets no label: unpacked, nothing predicts it; packed, the previous example
    would.
    """
    import torch

    ids, labels, positions, bounds = [], [], [], [0]
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE] + e.labels[1:]
        positions += range(len(e.input_ids))
        bounds.append(bounds[-1] + len(e.input_ids))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), SEGMENTS: tuple(bounds), **_teacher(examples)}


def n_tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a padded or packed batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())
