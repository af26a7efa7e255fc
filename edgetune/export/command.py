"""`edgetune export`: merge a run's adapter, write GGUF/ONNX files, verify each, then publish the folder.

Everything is written into `.OUT.tmp-<pid>` beside the output and renamed into place only after every
file passed verification, so a failure (or Ctrl-C, SIGTERM, a full disk) never leaves a half-written
export at OUT. While it works, the run folder it reads and the output it writes are locked.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgetune import folders, models
from edgetune.config import as_dict
from edgetune.errors import EdgetuneError
from edgetune.export.config import ExportConfig
from edgetune.folders import EXPORT_MARKERS
from edgetune.methods import Method, method_of
from edgetune.runfiles import ADAPTER_CONFIG, CHAT_TEMPLATE, EXPORT_CONFIG, RUN_CONFIG
from edgetune.signals import deferred, stop_on_signals

REJECTED_SUFFIX = ".rejected"  # --keep-failed: where an export that failed verification is kept


@dataclass(frozen=True)
class Source:
    """What an export starts from: the base model and, for a training run, its adapter."""

    model_dir: Path  # the base model's HF folder
    adapter_dir: Path | None
    run_config: dict | None  # the training run's settings (edgetune_run.yaml), if RUN is a run
    default_output: Path
    chat_template: str | None = None  # the template the run trained with, if not the model's own
    model_ref: str | None = None  # the base as the run names it (e.g. smollm2-135m)
    method: Method | None = None  # the adapter's (None for a plain model)


def read_source(config: ExportConfig) -> Source:
    """Interpret RUN: an `edgetune train` folder, a bare PEFT adapter folder, or a plain model."""
    source = _source(config)
    models.require_files(source.model_dir)
    return source


def _source(config: ExportConfig) -> Source:
    run = Path(config.run).expanduser()
    source = run_source(run, config.cache_dir)
    if source is not None:
        return source
    base = models.resolve(config.run, config.cache_dir)
    return Source(base, None, None, Path(f"{run.name.removesuffix('.gguf')}-export"))


def run_source(run: Path, cache_dir: str | None = None) -> Source | None:
    """An `edgetune train` (or `edgetune merge`) folder, or a bare PEFT adapter folder, as a Source
    with its base resolved; None when `run` is neither."""
    from edgetune.export.merge import is_adapter_dir, read_adapter_config

    if (run / RUN_CONFIG).is_file():
        saved = run_settings(run)
        if not is_adapter_dir(run):
            raise EdgetuneError(f"{run} has no adapter (adapter_model.safetensors): did training finish? "
                                f"Resume it with: edgetune train --resume --output {run}")
        if not saved.get("model"):
            raise EdgetuneError(f"{run}/{RUN_CONFIG} does not name the base model (model:)")
        base = models.resolve(str(saved["model"]), cache_dir or saved.get("cache_dir"))
        template = run / CHAT_TEMPLATE
        return Source(base, run, saved, run / "export",
                      template.read_text(encoding="utf-8") if template.is_file() else None,
                      str(saved["model"]), method_of(read_adapter_config(run)))
    if (run / ADAPTER_CONFIG).is_file():
        adapter_config = read_adapter_config(run)
        base_ref = adapter_config.get("base_model_name_or_path")
        if not base_ref:
            raise EdgetuneError(f"{run}/{ADAPTER_CONFIG} does not name its base model")
        return Source(models.resolve(base_ref, cache_dir), run, None, run / "export",
                      model_ref=base_ref, method=method_of(adapter_config))
    return None


def run_settings(run: Path) -> dict:
    """The run's edgetune_run.yaml as a dict, or a one-line error when it cannot be read."""
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
    """What to write: GGUF types, ONNX precisions (and whether the ONNX uses generic ops only),
    ExecuTorch and LiteRT-LM types."""

    gguf: list[str]
    onnx: list[str]
    onnx_generic: bool
    executorch: list[str] = field(default_factory=list)
    litert: list[str] = field(default_factory=list)

    @property
    def phone(self) -> dict[str, list[str]]:
        return {"executorch": self.executorch, "litert": self.litert}


def plan_formats(config: ExportConfig, model_dir: Path, method: Method | None = None) -> Formats:
    """The formats asked for, else what the --target device profile chooses (GGUF only for a method
    that learns inputs: the ONNX and phone models cannot take them)."""
    formats = Formats(config.gguf_types, config.onnx_types, config.onnx_generic,
                      config.executorch_types, config.litert_types)
    if config.onnx_generic and not formats.onnx:
        formats.onnx.append("fp32")
    asked = formats.gguf or formats.onnx or config.gguf_adapter or any(formats.phone.values())
    if config.target and asked:
        from edgetune.devices.selection import check_choices

        onnx = "onnx-generic" if formats.onnx_generic else "onnx"
        check_choices(config.target, model_dir, config.ctx,
                      [f"gguf:{t}" for t in formats.gguf] + [f"{onnx}:{t}" for t in formats.onnx]
                      + [f"{fmt}:{t}" for fmt, kinds in formats.phone.items() for t in kinds])
    if config.target and not asked:
        from edgetune.devices.selection import choose_export
        from edgetune.export.phone import unavailable

        for item in choose_export(config.target, model_dir, config.ctx, unavailable()):
            kind, _, value = item.partition(":")
            if kind != "gguf" and method is not None and not method.folds:
                print(f"edgetune: --target {config.target}: leaving out {kind} {value}, which cannot "
                      f"carry {method.title}")
                continue
            lists = {"gguf": formats.gguf, "onnx": formats.onnx, "onnx-generic": formats.onnx,
                     **formats.phone}
            lists[kind].append(value)
            formats.onnx_generic |= kind == "onnx-generic"
    return formats


def _check_imatrix_available(config: ExportConfig, source: Source, formats: Formats) -> None:
    """Refuse early the types llama.cpp makes only with an importance matrix when none will exist."""
    from edgetune.export.quantize import NEEDS_IMATRIX

    needs = [t for t in formats.gguf if t in NEEDS_IMATRIX]
    if needs and (config.imatrix == "none" or (config.imatrix == "auto" and source.run_config is None)):
        why = "--imatrix none" if config.imatrix == "none" else f"{config.run} is not a training run"
        raise EdgetuneError(f"--gguf {needs[0]}: llama.cpp makes it only with an importance matrix, "
                            f"and there is none ({why}): export a training run (its training data "
                            "calibrates one) or pass --imatrix FILE")


def check_carried(method: Method | None, config: ExportConfig, formats: Formats) -> None:
    """Refuse, in one line and before anything is written, a format that cannot carry the method:
    an export never holds the base model in place of the trained one."""
    if method is None:
        return
    if config.gguf_adapter and method.no_gguf_adapter:
        raise EdgetuneError(f"--gguf-adapter: {method.title} is not a llama.cpp LoRA adapter: "
                            f"{method.no_gguf_adapter}")
    if method.folds:
        return
    instead = "; export --gguf instead, which carries the soft prompt beside the model"
    token_only = ((["--onnx"] if formats.onnx else [])
                  + [f"--{fmt}" for fmt, kinds in formats.phone.items() if kinds])
    if token_only:  # ONNX and the phone runtimes take token ids, not input embeddings
        kind = "ONNX" if token_only[0] == "--onnx" else "phone"
        raise EdgetuneError(f"{token_only[0]}: {method.title} learns inputs, not weights, and the "
                            f"{kind} models take token ids only" + (instead if method.soft_prompt else ""))
    if formats.gguf and not method.soft_prompt:
        raise EdgetuneError(f"--gguf: {method.title}'s per-layer keys and values cannot be carried by a "
                            "GGUF file or fed to llama.cpp; train with --method prompt, ptuning or a "
                            "LoRA-family method to export")


def _check_phone(config: ExportConfig, formats: Formats, model_dir: Path) -> None:
    """One line before anything loads: a phone runtime not installed, an architecture it does not
    take, or a KV cache too short for the held-out positions verification decodes."""
    from edgetune.export import phone

    for fmt, kinds in formats.phone.items():
        if kinds:
            phone.require(fmt)
            length = phone.cache_length(phone.read_config(model_dir, fmt), config.ctx, quiet=True)
            if config.verify and length < config.positions:
                raise EdgetuneError(f"--ctx {length}: the {fmt} files' KV cache cannot hold the "
                                    f"{config.positions} held-out positions verification decodes; "
                                    f"pass --positions {length} or fewer")


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an old export is removed only after that succeeded."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    with deferred():
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        folders.fsync_dir(out.parent)
    folders.remove_tree(old)


def _check_output(config: ExportConfig, out: Path) -> None:
    """Refuse a folder edgetune did not make, and an export that would be replaced without --force."""
    if folders.inspect_output(out, EXPORT_MARKERS) == "ours" and not config.force:
        raise EdgetuneError(f"output folder {out} holds an export: pass --force to replace it "
                            "or --output elsewhere")


def run_lock(source: Source, verb: str = "edgetune export"):
    """The run folder's lock while `verb` reads an edgetune run: no training may write it meanwhile."""
    from contextlib import nullcontext

    run = source.adapter_dir
    if run is None or not (run / RUN_CONFIG).is_file() or not os.access(run, os.W_OK):
        return nullcontext()  # (no process can train into a folder it cannot write)
    return folders.folder_lock(run, f"run folder {run}", verb=verb)


def main(config: ExportConfig) -> int:
    with stop_on_signals():
        source = read_source(config)
        out = Path(config.output).expanduser() if config.output else source.default_output
        _check_output(config, out)
        if config.gguf_adapter and source.adapter_dir is None:
            raise EdgetuneError(f"--gguf-adapter: {config.run} is a model, "
                                "not a training run with an adapter")
        formats = plan_formats(config, source.model_dir, source.method)
        _check_imatrix_available(config, source, formats)
        check_carried(source.method, config, formats)
        _check_phone(config, formats, source.model_dir)
        with folders.disk_errors(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
        with run_lock(source), folders.sibling_lock(out, f"export folder {out}",
                                                      verb="edgetune export"):
            _check_output(config, out)
            folders.remove_leftovers(out.parent, prefix=f".{out.name}.")
            rows = _write(config, source, out, formats)
    if rows:
        from edgetune.export.report import table

        print(table(rows))
    else:
        print("edgetune: files not verified (--no-verify)")
    print(f"edgetune: wrote {out}")
    return 0


def _write(config: ExportConfig, source: Source, out: Path, formats: Formats) -> list:
    """Write and verify every file in a temporary folder, then publish it as `out` (or, with
    --keep-failed, keep a folder that failed verification as `out.rejected`)."""
    from edgetune.export.pipeline import export_files
    from edgetune.export.verify import VerificationFailed

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    rejected = out.with_name(out.name + REJECTED_SUFFIX)
    try:
        with folders.disk_errors(out.parent, cleanup=[tmp]):
            tmp.mkdir()
            settings = {**as_dict(config), "base_model": str(source.model_dir)}
            (tmp / EXPORT_CONFIG).write_text(yaml.safe_dump(settings, sort_keys=False))
            try:
                rows = export_files(config, source, tmp, formats,
                                    rejected if config.keep_failed else None)
            except VerificationFailed:
                if config.keep_failed:
                    with deferred():
                        folders.remove_tree(rejected)
                        tmp.rename(rejected)
                raise
            folders.fsync_tree(tmp)
            publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
