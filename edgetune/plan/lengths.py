"""Token lengths of a training file, for choosing --seq-len and estimating steps and time.

Counts with the model's own tokenizer.json through the `tokenizers` library (no torch) when the model
is a local folder that has one; otherwise estimates four characters per token and says so.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from edgetune.records import read_jsonl, to_messages

CHARS_PER_TOKEN = 4.0  # English text with a modern BPE vocabulary
# Chat-template tokens around each message (role markers, separators), for the estimate.
TEMPLATE_TOKENS_PER_MESSAGE = 5


@dataclass(frozen=True)
class Lengths:
    """Token counts per example, and how they were obtained."""

    counts: tuple[int, ...]
    exact: bool  # False: characters / 4, because no tokenizer was at hand

    def percentile(self, p: float) -> int:
        ordered = sorted(self.counts)
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    def tokens(self, seq_len: int) -> int:
        """Tokens trained per epoch once examples are truncated to `seq_len`."""
        return sum(min(n, seq_len) for n in self.counts)


def _texts(path: str) -> list[str]:
    fmt, records = read_jsonl(path)
    if fmt == "text":
        return [r["text"] for r in records]
    texts = []
    for record in records:
        messages = to_messages(record, fmt)
        texts.append("\n".join(m["content"] for m in messages) + "\n" * TEMPLATE_TOKENS_PER_MESSAGE
                     * len(messages))
    return texts


def measure(path: str, model_dir: Path | None = None) -> Lengths:
    """Token lengths of each record of `path` (template tokens estimated for chat and alpaca)."""
    texts = _texts(path)
    tokenizer_file = model_dir / "tokenizer.json" if model_dir is not None else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        encoded = tokenizer.encode_batch(texts)
        return Lengths(tuple(len(e.ids) + 1 for e in encoded), exact=True)
    return Lengths(tuple(max(1, round(len(t) / CHARS_PER_TOKEN)) for t in texts), exact=False)


def choose_seq_len(lengths: Lengths, cap: int = 4096) -> int:
    """The 95th-percentile length rounded up to a multiple of 64: the longest 5% are truncated."""
    p95 = lengths.percentile(95)
    return min(cap, max(64, 64 * math.ceil(p95 / 64)))
