"""`edgetune report RUN`: what a run did and how its exports verified, in a few lines and a picture.

Reads only what the run folder holds (its settings, train_log.jsonl, the report.json of each export
inside it) and redraws training.png from the log; imports no torch.
"""

import dataclasses
import json
import statistics
import webbrowser
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgetune.config import option
from edgetune.errors import EdgetuneError
from edgetune.methods import METHODS
from edgetune.runfiles import CHECKPOINTS, REPORT, REPORT_MD, RUN_CONFIG


@dataclass(frozen=True)
class ReportConfig:
    run: str | None = option(None, "run folder from `edgetune train`, or an export folder",
                             positional=True, metavar="RUN")
    open: bool = option(False, "also open the training curves and export reports in a viewer")

    def __post_init__(self) -> None:
        if not self.run:
            raise EdgetuneError("no run: pass a run folder, e.g. edgetune report edgetune-run")


def _method_text(saved: dict) -> str:
    """'lora rank 16', 'ia3' or 'prompt, 20 virtual tokens' for a run's settings."""
    name = saved.get("method") or "lora"
    chosen = METHODS.get(name)
    if chosen is not None and chosen.virtual_tokens:
        return f"{name}, {saved.get('virtual_tokens')} virtual tokens"
    return name if chosen is not None and not chosen.ranked else f"{name} rank {saved.get('rank')}"


def run_summary(run_dir: Path, records: list[dict]) -> list[str]:
    """A few lines on a run: its settings, progress, losses, speed and memory."""
    try:
        saved = yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}
    except yaml.YAMLError as exc:
        raise EdgetuneError(f"{run_dir / RUN_CONFIG}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(saved.get("merge"), dict):
        return merge_summary(run_dir, saved)
    base = saved.get("quant") if saved.get("quant") not in (None, "none") else saved.get("dtype")
    lines = [f"{run_dir}: {saved.get('model')} on {saved.get('data')}",
             f"  {_method_text(saved)}, base {base}, batch "
             f"{saved.get('batch_size')} x {saved.get('grad_accum')}, lr {saved.get('lr')}, "
             f"seq-len {saved.get('seq_len')}"]
    if not records:
        return lines + ["  no training steps logged yet"]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    lines.append(f"  {records[-1]['step']} steps logged; train loss {losses[0]:.4f} -> {losses[-1]:.4f}"
                 + (f"; eval loss {evals[-1][1]:.4f} at step {evals[-1][0]}" if evals else ""))
    if speeds:
        peak = max(r.get("rss_mb", 0) for r in records) / 1024
        lines.append(f"  median {statistics.median(speeds):.0f} tokens/s per step; largest RSS "
                     f"logged {peak:.2f} GiB")
    checkpoints = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("step-*")) \
        if (run_dir / CHECKPOINTS).is_dir() else []
    if checkpoints:
        lines.append(f"  checkpoints: {', '.join(checkpoints)}")
    return lines


def merge_summary(run_dir: Path, saved: dict) -> list[str]:
    """The lines for a run folder written by `edgetune merge`."""
    merge = saved["merge"]
    weights = ", ".join(f"{w:g}" for w in merge.get("weights", []))
    lines = [f"{run_dir}: merge of {len(merge.get('inputs', []))} runs on {saved.get('model')}",
             f"  {merge.get('method')} (weights {weights}) at rank {merge.get('rank')}"]
    energy = merge.get("energy_kept")
    if energy:
        lines[-1] += f"; energy kept min {energy['min']:.2%}, median {energy['median']:.2%}"
    return lines + [f"  input: {run}" for run in merge.get("inputs", [])]


def export_summary(folder: Path) -> str:
    """The verification table of one export folder, from its report.json."""
    from edgetune.export.report import Verification, table

    try:
        data = json.loads((folder / REPORT).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgetuneError(f"{folder / REPORT}: cannot read the export report ({exc})") from None
    names = {f.name for f in dataclasses.fields(Verification)}
    rows = [Verification(**{k: v for k, v in row.items() if k in names}) for row in data]
    return f"{folder}:\n{table(rows)}"


def main(config: ReportConfig) -> int:
    from edgetune.train import curves

    run = Path(config.run).expanduser()
    if not run.is_dir():
        raise EdgetuneError(f"{run} is not a folder: pass a run folder from `edgetune train`")
    is_run, is_export = (run / RUN_CONFIG).is_file(), (run / REPORT).is_file()
    if not (is_run or is_export):
        raise EdgetuneError(f"{run} is neither a run folder (no {RUN_CONFIG}) nor an export folder "
                            f"(no {REPORT})")
    opened = []
    if is_run:
        print("\n".join(run_summary(run, curves.read_log(run))))
        picture = curves.update(run, title=str(run))
        if picture is not None:
            print(f"  training curves: {picture}")
            opened.append(picture)
    exports = [run] if is_export else sorted(p.parent for p in run.glob(f"*/{REPORT}"))
    for folder in exports:
        print(export_summary(folder))
        opened.append(folder / REPORT_MD)
    if config.open:
        for path in opened:
            if path.is_file() and not webbrowser.open(path.resolve().as_uri()):
                print(f"edgetune: no viewer to open {path} with")
    return 0
