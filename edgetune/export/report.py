"""One verification report for every exported file: a table on screen and report.json beside the files."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.runfiles import REPORT, REPORT_MD
from edgetune.tables import columns


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


def _cells(rows: list[Verification]) -> list[tuple[str, ...]]:
    """The report's header and one row of text cells per file."""
    head = ("file", "format", "size", "top-1", "max |dlogit|", "ppl ratio", "decode tok/s", "")
    cells = [head]
    for r in rows:
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        cells.append((r.file, r.format, f"{r.size_bytes / 2**20:.1f} MiB", f"{r.top1_agreement:.1%}",
                      f"{r.max_logit_diff:.3f}", f"{r.perplexity_ratio:.3f}", tps,
                      "ok" if r.passed else "FAILED"))
    return cells


def table(rows: list[Verification]) -> str:
    """The report as aligned text columns."""
    notes = [f"  {r.file}: {r.note}" for r in rows if r.note]
    return "\n".join([columns(_cells(rows))] + notes)


def markdown(rows: list[Verification], title: str = "Export verification") -> str:
    """The report as a Markdown page: what each file is, and how it compares with torch."""
    head, *body = _cells(rows)
    lines = [f"# {title}", "", "Each file was loaded in its own runtime and compared with the torch "
             "model on the same held-out token ids.", "",
             "| " + " | ".join(head[:-1] + ("verdict",)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    notes = [f"- `{r.file}`: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write(rows: list[Verification], folder: Path) -> None:
    """report.json (for programs) and report.md (for people) in the export folder."""
    data = [asdict(r) | {"perplexity_ratio": r.perplexity_ratio} for r in rows]
    (folder / REPORT).write_text(json.dumps(data, indent=2) + "\n")
    (folder / REPORT_MD).write_text(markdown(rows))
