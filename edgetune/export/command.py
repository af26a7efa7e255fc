"""`edgetune export`: merge a run's adapter, write GGUF/ONNX files, verify each, then publish the folder.

Everything is written into `OUT.tmp-<pid>` beside the output and renamed into place only after every
file passed verification, so a failure (or Ctrl-C) never leaves a half-written export at OUT.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgetune import models, templates
from edgetune.errors import EdgetuneError
from edgetune.export.config import ExportConfig
from edgetune.runfiles import ADAPTER_CONFIG, CHAT_TEMPLATE, RUN_CONFIG


@dataclass(frozen=True)
class Source:
    """What an export starts from: the base model and, for a training run, its adapter."""

    model_dir: Path  # the base model's HF folder
    adapter_dir: Path | None
    eval_data: str | None
    default_output: Path
    chat_template: str | None = None  # the template the run trained with, if not the model's own


def read_source(config: ExportConfig) -> Source:
    """Interpret RUN: an `edgetune train` folder, a bare PEFT adapter folder, or a plain model."""
    source = _source(config)
    models.require_files(source.model_dir)
    return source


def _source(config: ExportConfig) -> Source:
    from edgetune.export.merge import is_adapter_dir, read_adapter_config

    run = Path(config.run).expanduser()
    if (run / RUN_CONFIG).is_file():
        saved = _run_settings(run)
        if not is_adapter_dir(run):
            raise EdgetuneError(f"{run} has no adapter (adapter_model.safetensors): did training finish? "
                                f"Resume it with: edgetune train --resume --output {run}")
        if not saved.get("model"):
            raise EdgetuneError(f"{run}/{RUN_CONFIG} does not name the base model (model:)")
        base = models.resolve(str(saved["model"]), config.cache_dir or saved.get("cache_dir"))
        template = run / CHAT_TEMPLATE
        return Source(base, run, saved.get("eval_data"), run / "export",
                      template.read_text(encoding="utf-8") if template.is_file() else None)
    if (run / ADAPTER_CONFIG).is_file():
        base_ref = read_adapter_config(run).get("base_model_name_or_path")
        if not base_ref:
            raise EdgetuneError(f"{run}/{ADAPTER_CONFIG} does not name its base model")
        return Source(models.resolve(base_ref, config.cache_dir), run, None, run / "export")
    base = models.resolve(config.run, config.cache_dir)
    return Source(base, None, None, Path(f"{run.name.removesuffix('.gguf')}-export"))


def _run_settings(run: Path) -> dict:
    try:
        saved = yaml.safe_load((run / RUN_CONFIG).read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise EdgetuneError(f"{run / RUN_CONFIG}: not a readable run file ({str(exc).splitlines()[0]})") \
            from None
    if not isinstance(saved, dict):
        raise EdgetuneError(f"{run / RUN_CONFIG}: expected a mapping of settings")
    return saved


@dataclass
class Formats:
    """What to write: GGUF types, ONNX precisions, and whether the ONNX uses generic ops only."""

    gguf: list[str]
    onnx: list[str]
    onnx_generic: bool


def plan_formats(config: ExportConfig, model_dir: Path) -> Formats:
    """The formats asked for, else what the --target device profile chooses."""
    formats = Formats(config.gguf_types, config.onnx_types, config.onnx_generic)
    if config.onnx_generic and not formats.onnx:
        formats.onnx.append("fp32")
    if config.target and not (formats.gguf or formats.onnx or config.gguf_adapter):
        from edgetune.devices.selection import choose_export

        for item in choose_export(config.target, model_dir, config.ctx):
            kind, _, value = item.partition(":")
            (formats.gguf if kind == "gguf" else formats.onnx).append(value)
            formats.onnx_generic |= kind == "onnx-generic"
    return formats


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an old export is removed only after that succeeded."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(config: ExportConfig) -> int:
    source = read_source(config)
    out = Path(config.output).expanduser() if config.output else source.default_output
    if out.exists() and not config.force:
        raise EdgetuneError(f"output folder {out} exists: pass --force to replace it "
                            "or --output elsewhere")
    if config.gguf_adapter and source.adapter_dir is None:
        raise EdgetuneError(f"--gguf-adapter: {config.run} is a model, "
                            "not a training run with an adapter")
    formats = plan_formats(config, source.model_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from edgetune.export.pipeline import export_files

        rows = export_files(config, source, tmp, formats)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        from edgetune.export.report import table

        print(table(rows))
    else:
        print("edgetune: files not verified (--no-verify)")
    print(f"edgetune: wrote {out}")
    return 0

