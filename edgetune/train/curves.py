"""The training-curve picture of a run: train and eval loss, learning rate, tokens/s and RSS per step.

Drawn from the run's train_log.jsonl with matplotlib, an optional dependency (`pip install
"edgetune[plots]"`): without it, or when drawing fails, training goes on and says so once. The figure
is built on matplotlib's object API (no pyplot), so no global backend or state is touched.
"""

import json
import os
from pathlib import Path

from edgetune.runfiles import CURVES, TRAIN_LOG

_warned = False


def read_log(run_dir: Path) -> list[dict]:
    """The run's step records, skipping a last line cut short by a kill."""
    file = Path(run_dir) / TRAIN_LOG
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def draw(records: list[dict], out: Path, title: str = "") -> bool:
    """Write the four panels to `out` (PNG, via a temporary file); False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    (loss, lr), (speed, memory) = figure.subplots(2, 2, sharex=True)
    steps, losses = _series(records, "loss")
    loss.plot(steps, losses, label="train", color="tab:blue")
    steps, evals = _series(records, "eval_loss")
    if evals:
        loss.plot(steps, evals, "o-", label="eval", color="tab:orange")
    positive = [v for v in losses + evals if v > 0]
    wide = positive and max(positive) > 20 * min(positive)  # a loss falling by orders of magnitude
    loss.set(title="loss (mean per label token)", yscale="log" if wide else "linear")
    loss.legend()
    lr.plot(*_series(records, "lr"), color="tab:green")
    lr.set(title="learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    speed.plot(*_series(records, "tokens_per_s"), color="tab:purple")
    speed.set(title="tokens/s", xlabel="step", ylim=(0, None))
    steps, rss = _series(records, "rss_mb")
    memory.plot(steps, [m / 1024 for m in rss], color="tab:red")
    memory.set(title="resident memory (GiB)", xlabel="step", ylim=(0, None))
    if title:
        figure.suptitle(title)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format="png", dpi=90)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def update(run_dir: Path, title: str = "") -> Path | None:
    """Redraw the run's curves from its log; never raises for a missing or failing plotting library."""
    global _warned
    out = Path(run_dir) / CURVES
    records = read_log(run_dir)
    if not records:
        return None
    try:
        drawn = draw(records, out, title)
    except (OSError, ValueError, RuntimeError) as exc:  # a picture is never worth a failed run
        if not _warned:
            print(f"edgetune: could not draw {out.name} ({exc}); training goes on")
        _warned = True
        return None
    if not drawn:
        if not _warned:
            print(f'edgetune: no {CURVES}: install matplotlib (pip install "edgetune[plots]") to get it')
        _warned = True
        return None
    return out
