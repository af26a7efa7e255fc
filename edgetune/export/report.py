"""One verification report for every exported file: a table on screen and report.json beside the files."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Verification:
    """How one exported file compares with the torch merged model on held-out text."""

    file: str  # path relative to the export folder
    format: str  # e.g. "gguf q8_0", "gguf adapter f16", "onnx int8"
    size_bytes: int
    positions: int  # next-token positions compared
    top1_agreement: float  # share of positions where the argmax token matches torch's
    max_logit_diff: float
    perplexity: float  # of the exported file on the held-out text
    torch_perplexity: float  # of the torch merged model on the same text
    decode_tokens_per_s: float | None
    passed: bool
    note: str = ""

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.torch_perplexity if self.torch_perplexity else math.nan


def table(rows: list[Verification]) -> str:
    """The report as aligned text columns."""
    head = ("file", "format", "size", "top-1", "max |dlogit|", "ppl ratio", "decode tok/s", "")
    lines = [head]
    for r in rows:
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        lines.append((r.file, r.format, f"{r.size_bytes / 2**20:.1f} MiB", f"{r.top1_agreement:.1%}",
                      f"{r.max_logit_diff:.3f}", f"{r.perplexity_ratio:.3f}", tps,
                      "ok" if r.passed else "FAILED"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    notes = [f"  {r.file}: {r.note}" for r in rows if r.note]
    return "\n".join(text + notes)


def write_json(rows: list[Verification], path: Path) -> None:
    data = [asdict(r) | {"perplexity_ratio": r.perplexity_ratio} for r in rows]
    path.write_text(json.dumps(data, indent=2) + "\n")
