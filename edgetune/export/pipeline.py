"""The export pipeline: every file of one export written and verified inside its temporary folder
(command.py publishes the folder once all of it passed)."""

import shutil
from pathlib import Path

from edgetune.export.report import Verification, write


def _say(message: str) -> None:
    print(f"edgetune: {message}", flush=True)


def export_files(config, source, tmp: Path, formats) -> list[Verification]:
    """Write every requested file into `tmp`, verify each, write report.json; returns the rows."""
    from transformers import AutoTokenizer

    from edgetune.export.gguf_vocab import chat_stops
    from edgetune.export.heldout import held_out_ids
    from edgetune.export.merge import merge
    from edgetune.export.verify import require_passed, torch_reference

    work = tmp / ".work"  # intermediate files; removed before the folder is published
    model_dir = source.model_dir
    if source.adapter_dir is not None:
        _say(f"merging {source.adapter_dir} into {source.model_dir.name}")
        model_dir = merge(source.model_dir, source.adapter_dir, work / "merged")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if source.chat_template is not None:  # the run's template goes into every file
        tokenizer.chat_template = source.chat_template
        if source.adapter_dir is not None:
            tokenizer.save_pretrained(model_dir)  # the merged folder: ONNX builders copy it
    ids = held_out_ids(tokenizer, source.eval_data, config.positions)
    reference = torch_reference(model_dir, ids) if config.verify else None
    chat = (tokenizer.chat_template, chat_stops(tokenizer))
    rows = gguf_models(model_dir, tmp, work, formats.gguf, reference, chat)
    if config.gguf_adapter:
        rows.append(gguf_adapter(source, tmp, reference, chat))
    for precision in formats.onnx:
        from edgetune.export.onnx import export_onnx

        folder = f"onnx-{precision}" + ("-generic" if formats.onnx_generic else "")
        _say(f"writing {folder}")
        rows.append(export_onnx(model_dir, tmp / folder, precision, formats.onnx_generic, ids,
                                max_length=config.ctx if config.target else None))
    rows = [r for r in rows if r is not None]
    if config.verify:
        require_passed(rows)
        write(rows, tmp)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def gguf_models(model_dir: Path, tmp: Path, work: Path, types: list[str], reference,
                chat: tuple) -> list[Verification]:
    """model-<type>.gguf for each type (sub-8-bit ones quantized from an f16 file) and Modelfiles."""
    from edgetune.export.gguf import DIRECT_TYPES, write_gguf
    from edgetune.export.modelfile import write_modelfile
    from edgetune.export.quantize import quantize
    from edgetune.export.verify import verify_gguf

    low = [t for t in types if t not in DIRECT_TYPES]
    direct = [t for t in types if t in DIRECT_TYPES] + (["f16"] if low and "f16" not in types else [])
    notes: dict[str, list[str]] = {}
    for kind in direct:
        folder = tmp if kind in types else work
        folder.mkdir(parents=True, exist_ok=True)
        _say(f"writing model-{kind}.gguf")
        notes[kind] = write_gguf(model_dir, folder / f"model-{kind}.gguf", kind, chat[0])
    f16 = tmp / "model-f16.gguf" if "f16" in types else work / "model-f16.gguf"
    for kind in low:
        _say(f"quantizing model-{kind}.gguf with llama.cpp")
        notes[kind] = quantize(f16, tmp / f"model-{kind}.gguf", kind)
    rows = []
    for kind in types:
        write_modelfile(tmp / f"model-{kind}.gguf", *chat)
        if reference is not None:
            _say(f"verifying model-{kind}.gguf in llama.cpp")
            rows.append(verify_gguf(tmp, f"model-{kind}.gguf", kind, reference, "; ".join(notes[kind])))
    return rows


def gguf_adapter(source, tmp: Path, reference, chat: tuple) -> Verification | None:
    """adapter.gguf plus the unmerged f16 base it applies to, checked together against the merge."""
    from edgetune.export.gguf import write_adapter_gguf, write_gguf
    from edgetune.export.modelfile import write_modelfile
    from edgetune.export.verify import verify_gguf

    _say("writing base-f16.gguf and adapter.gguf")
    write_gguf(source.model_dir, tmp / "base-f16.gguf", "f16", chat[0])
    alpha = write_adapter_gguf(source.model_dir, source.adapter_dir, tmp / "adapter.gguf")
    write_modelfile(tmp / "base-f16.gguf", *chat, adapter=tmp / "adapter.gguf")
    if reference is None:
        return None
    _say("verifying adapter.gguf over base-f16.gguf in llama.cpp")
    return verify_gguf(tmp, "base-f16.gguf", "f16", reference, f"lora alpha {alpha:g}",
                       lora="adapter.gguf")
