"""One verification report for every exported file: a table on screen and report.json beside the files."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetune.runfiles import REPORT, REPORT_MD
from edgetune.tables import columns


@dataclass
class Verification:
    """How one exported file compares with the torch merged model on held-out text (see gate.py)."""

    file: str  # path relative to the export folder
    format: str  # e.g. "gguf q8_0", "gguf adapter over f16", "onnx int8"
    size_bytes: int
    positions: int  # next-token positions compared
    top1_agreement: float  # share of positions where the argmax token matches torch's
    max_logit_diff: float
    perplexity: float  # of the exported file on the held-out text
    torch_perplexity: float  # of the torch merged model on the same text
    decode_tokens_per_s: float | None
    passed: bool
    note: str = ""
    # The KL-divergence measures (defaults only so that older report.json files still read).
    kld_mean: float = math.nan  # mean KL(torch || file), nats
    kld_p99: float = math.nan  # its 99th percentile over positions
    relative_kld: float = math.nan  # kld_mean / mean KL(torch || uniform)
    clear_top1: float | None = None  # top-1 at positions where torch's top-2 margin is clear
    clear_positions: int = 0
    failures: list[str] = field(default_factory=list)  # each failed measure with its threshold

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.torch_perplexity if self.torch_perplexity else math.nan


def _cells(rows: list[Verification]) -> list[tuple[str, ...]]:
    """The report's header and one row of text cells per file."""
    head = ("file", "format", "size", "KLD", "rel KLD", "KLD p99", "top-1", "clear top-1",
            "ppl ratio", "decode tok/s", "")
    cells = [head]
    for r in rows:
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        clear = f"{r.clear_top1:.1%}" if r.clear_top1 is not None else "-"
        cells.append((r.file, r.format, f"{r.size_bytes / 2**20:.1f} MiB", f"{r.kld_mean:.4f}",
                      f"{r.relative_kld:.2%}", f"{r.kld_p99:.4f}", f"{r.top1_agreement:.1%}", clear,
                      f"{r.perplexity_ratio:.3f}", tps, "ok" if r.passed else "FAILED"))
    return cells


def _notes(r: Verification) -> list[str]:
    return [n for n in [r.note] + r.failures if n]


def table(rows: list[Verification]) -> str:
    """The report as aligned text columns."""
    notes = [f"  {r.file}: {n}" for r in rows for n in _notes(r)]
    return "\n".join([columns(_cells(rows))] + notes)


def markdown(rows: list[Verification], title: str = "Export verification") -> str:
    """The report as a Markdown page: what each file is, and how it compares with torch."""
    head, *body = _cells(rows)
    lines = [f"# {title}", "", "Each file was loaded in its own runtime and compared with the torch "
             "model on the same held-out token ids: KLD is the mean KL(torch || file) in nats, rel KLD "
             "that as a share of a know-nothing (uniform) model's, clear top-1 the agreement where "
             "torch's top token leads by at least 1 nat.", "",
             "| " + " | ".join(head[:-1] + ("verdict",)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    notes = [f"- `{r.file}`: {n}" for r in rows for n in _notes(r)]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write(rows: list[Verification], folder: Path) -> None:
    """report.json (for programs) and report.md (for people) in the export folder."""
    data = [asdict(r) | {"perplexity_ratio": r.perplexity_ratio} for r in rows]
    (folder / REPORT).write_text(json.dumps(data, indent=2) + "\n")
    (folder / REPORT_MD).write_text(markdown(rows))
