"""`--resume`: continue a run with its own recorded settings, changing only what the user named.

A run folder records its settings in `edgetune_run.yaml`. On `--resume` those are the settings; a
setting the user gave on the resume command (a flag or a YAML key, see `config.given_names`)
replaces the recorded one when it may change mid-run (how often to save, how many threads) and is
refused when it would make the run a different one (learning rate, data, rank...).
"""

import dataclasses
import json
from pathlib import Path

import yaml

from edgetune import folders
from edgetune.config import given_names
from edgetune.errors import EdgetuneError
from edgetune.runfiles import RUN_CONFIG, TRAIN_LOG
from edgetune.train.config import TrainConfig

# Settings a resumed run may change; every other one is the run's own.
RESUMABLE = {"resume", "progress", "threads", "ram", "save_every", "eval_every", "keep_checkpoints",
             "cache_dir", "output", "nproc", "dist_timeout"}
PATHS = ("data", "eval_data", "model", "cache_dir")  # recorded as absolute paths where they exist


def recorded_settings(config: TrainConfig) -> dict:
    """The settings to record in the run folder, with local paths made absolute.

    A run resumed from another working folder then still finds its data and model.
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if not f.metadata.get("given")}
    for name in PATHS:
        value = values.get(name)
        if value and Path(value).expanduser().exists():
            values[name] = str(Path(value).expanduser().resolve())
    return values


def read_recorded(run_dir: Path) -> dict:
    """The settings in RUN/edgetune_run.yaml, checked to be a mapping."""
    file = run_dir / RUN_CONFIG
    try:
        saved = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EdgetuneError(f"--resume: cannot read {file} ({str(exc).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise EdgetuneError(f"--resume: {file} is not a mapping of settings")
    return saved


def _same(name: str, a: object, b: object) -> bool:
    if name in PATHS and a and b:
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    return a == b


def resumed_config(config: TrainConfig, run_dir: Path) -> tuple[TrainConfig, list[str]]:
    """The run's recorded settings with the user's given changes applied, and those changes.

    Raises when a given setting may not change in a resumed run.
    """
    saved = read_recorded(run_dir)
    kind = type(config)  # TrainConfig, or a verb's settings built on it (edgetune distill)
    known = {f.name for f in dataclasses.fields(kind) if not f.metadata.get("given")}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise EdgetuneError(f"--resume: {run_dir / RUN_CONFIG} has unknown setting {unknown[0]!r}")
    values = {**saved, "resume": True, "force": False, "output": config.output}
    changes = []
    for name in sorted(given_names(config) - {"resume", "output", "config"}):
        new, old = getattr(config, name), saved.get(name)
        if _same(name, new, old):
            continue
        flag = "--" + name.replace("_", "-")
        if name not in RESUMABLE:
            raise EdgetuneError(f"--resume continues {run_dir} with its recorded settings, and {flag} "
                                f"cannot change in a running run (recorded {old!r}, given {new!r}); "
                                f"start a new run with --force to use it")
        values[name] = new
        changes.append(f"{flag} {old} -> {new}")
    try:
        return kind(**values), changes
    except TypeError as exc:
        raise EdgetuneError(f"--resume: {run_dir / RUN_CONFIG} is not a run's settings ({exc})") from None


def truncate_log(run_dir: Path, step: int) -> int:
    """Keep only the log records up to `step` (the checkpoint resumed from); returns how many."""
    log = run_dir / TRAIN_LOG
    if not log.is_file():
        return 0
    kept = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the process was killed
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    folders.write_text_atomic(log, "".join(line + "\n" for line in kept))
    return len(kept)
