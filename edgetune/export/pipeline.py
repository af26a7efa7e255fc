"""The export pipeline: every file of one export written and verified inside its temporary folder
(command.py publishes the folder once all of it passed)."""

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetune import folders
from edgetune.export.report import Verification, write
from edgetune.runfiles import SOFT_PROMPT

# Bytes per weight on disk, an upper bound per file kind (the k-quant mixes keep some tensors at
# 6 or 8 bits; an ONNX build writes an fp32 model first and quantizes it beside). Every GGUF type
# below 8 bits is at most LOW_BIT_BYTES.
BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "onnx-fp32": 4.0, "onnx-int8": 5.0,
                    "onnx-int4": 4.7}
LOW_BIT_BYTES = 0.9


def _say(message: str) -> None:
    print(f"edgetune: {message}", flush=True)


def export_files(config, source, tmp: Path, formats, rejected: Path | None = None) -> list[Verification]:
    """Write every requested file into `tmp`, verify each, write report.json; returns the rows.

    `rejected` is where command.py keeps the folder when verification fails (--keep-failed).
    """
    from transformers import AutoTokenizer

    from edgetune.export.gguf_vocab import chat_stops
    from edgetune.export.heldout import held_out_ids, run_examples
    from edgetune.export.merge import merge
    from edgetune.export.verify import require_passed, torch_reference

    work = tmp / ".work"  # intermediate files; removed before the folder is published
    model_dir, embeddings = source.model_dir, None
    folders.require_space(tmp.parent, needed_bytes(config, source, formats), "this export")
    if source.adapter_dir is not None and source.method.folds:
        _say(f"merging {source.adapter_dir} ({source.method.title}) into {source.model_dir.name}")
        model_dir = merge(source.model_dir, source.adapter_dir, work / "merged")
    elif source.adapter_dir is not None:  # a soft prompt: the base model, and its vectors beside it
        from edgetune.export import soft_prompt

        _say(f"writing {SOFT_PROMPT} ({source.method.title}) for the unchanged base model")
        embeddings = soft_prompt.from_adapter(source.adapter_dir)
        soft_prompt.write(tmp / SOFT_PROMPT, embeddings, source.method.name, str(source.model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if source.chat_template is not None:  # the run's template goes into every file
        tokenizer.chat_template = source.chat_template
        if source.adapter_dir is not None and source.method.folds:
            tokenizer.save_pretrained(model_dir)  # the merged folder: ONNX builders copy it
    train, held = run_examples(source.run_config, tokenizer) if source.run_config else ([], [])
    ids = held_out_ids(tokenizer, held, config.positions)
    reference = torch_reference(model_dir, ids, embeddings) if config.verify else None
    chat = (tokenizer.chat_template, chat_stops(tokenizer))
    calibration = Calibration(config.imatrix, train, (source.run_config or {}).get("data"))
    rows = gguf_models(model_dir, tmp, work, formats.gguf, reference, chat, calibration,
                       soft=SOFT_PROMPT if embeddings is not None else None)
    if config.gguf_adapter:
        rows.append(gguf_adapter(source, tmp, reference, chat))
    for precision in formats.onnx:
        from edgetune.export.onnx import export_onnx

        folder = f"onnx-{precision}" + ("-generic" if formats.onnx_generic else "")
        _say(f"writing {folder}")
        rows.append(export_onnx(model_dir, tmp / folder, precision, formats.onnx_generic, ids,
                                max_length=config.ctx if config.target else None))
    if any(formats.phone.values()):
        rows += phone_files(model_dir, tokenizer, tmp, work, formats, config.ctx, reference)
    rows = [r for r in rows if r is not None]
    shutil.rmtree(work, ignore_errors=True)
    if config.verify:
        write(rows, tmp)
        require_passed(rows, str(rejected) if rejected else None)
    return rows


def n_weights(model_dir: Path) -> int:
    """Weights in an HF folder, read from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    from edgetune.hf import weight_files

    total = 0
    for file in weight_files(Path(model_dir)):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def needed_bytes(config, source, formats) -> int:
    """What the export's files take at their largest, intermediates included (an upper bound)."""
    from edgetune.export.gguf import DIRECT_TYPES

    weights = n_weights(source.model_dir)
    kinds = list(formats.gguf) + [f"onnx-{p}" for p in formats.onnx]
    if any(k not in DIRECT_TYPES for k in formats.gguf) and "f16" not in kinds:
        kinds.append("f16")  # the intermediate llama.cpp quantizes from
    if config.gguf_adapter:
        kinds.append("f16")
    total = sum(BYTES_PER_WEIGHT.get(k, LOW_BIT_BYTES) for k in kinds) * weights
    if source.adapter_dir is not None:
        total += 4 * weights  # the fp32 merged model
    return int(total)


@dataclass(frozen=True)
class Calibration:
    """Where the importance matrix comes from: --imatrix and the run's training examples."""

    mode: str  # auto, none or a file
    train: list  # token ids per training example
    data: str | None  # the training data file, named in imatrix.gguf

    def matrix(self, model_dir: Path, f16: Path, out: Path) -> tuple[dict | None, str]:
        """({GGUF weight name: mean x^2}, report note) for quantizing, or (None, note)."""
        from edgetune.export import imatrix

        if self.mode == "none":
            return None, "no importance matrix (--imatrix none)"
        if self.mode != "auto":
            loaded = imatrix.read(Path(self.mode).expanduser())
            imatrix.check(loaded, f16, self.mode)
            return loaded.means(), f"importance matrix from {self.mode}"
        if not self.train:
            _say("no training data to calibrate an importance matrix with: quantizing without one "
                 "(--imatrix FILE uses one made elsewhere)")
            return None, "no importance matrix (no training data)"
        chunks = imatrix.calibration_chunks(self.train)
        tokens = sum(len(c) for c in chunks)
        _say(f"computing the importance matrix over {tokens} tokens of {self.data}")
        computed = imatrix.compute(model_dir, chunks, [str(self.data)])
        imatrix.write(computed, out)
        return computed.means(), f"importance matrix {out.name} ({tokens} tokens of {Path(self.data).name})"


def gguf_models(model_dir: Path, tmp: Path, work: Path, types: list[str], reference, chat: tuple,
                calibration: Calibration, soft: str | None = None) -> list[Verification]:
    """model-<type>.gguf for each type (sub-8-bit ones quantized from an f16 file) and Modelfiles.

    With a `soft` prompt file the files are base-<type>.gguf, verified after the soft prompt's
    vectors, and get no Modelfile: Ollama cannot put input embeddings before a prompt, and would run
    the base model without the method.
    """
    from edgetune.export.gguf import DIRECT_TYPES, write_gguf
    from edgetune.export.modelfile import write_modelfile
    from edgetune.export.quantize import quantize
    from edgetune.export.verify import verify_gguf

    stem = "base" if soft else "model"
    low = [t for t in types if t not in DIRECT_TYPES]
    direct = [t for t in types if t in DIRECT_TYPES] + (["f16"] if low and "f16" not in types else [])
    notes: dict[str, list[str]] = {}
    for kind in direct:
        folder = tmp if kind in types else work
        folder.mkdir(parents=True, exist_ok=True)
        _say(f"writing {stem}-{kind}.gguf")
        notes[kind] = write_gguf(model_dir, folder / f"{stem}-{kind}.gguf", kind, chat[0])
    f16 = (tmp if "f16" in types else work) / f"{stem}-f16.gguf"
    rows = []
    if low:
        matrix, source = calibration.matrix(model_dir, f16, tmp / "imatrix.gguf")
        if "f16" not in types and reference is not None:
            # A wrong layout or hyper-parameter shows in the f16 file llama.cpp quantizes from, where
            # the gate is tight; the sub-8-bit files themselves are only reported.
            _say(f"verifying the intermediate {f16.name} in llama.cpp")
            rows.append(verify_gguf(work, f16.name, "f16", reference,
                                    "intermediate file llama.cpp quantized from; not kept",
                                    soft_prompt=soft and str(tmp / soft)))
        for kind in low:
            _say(f"quantizing {stem}-{kind}.gguf with llama.cpp")
            notes[kind] = [source] + quantize(f16, tmp / f"{stem}-{kind}.gguf", kind, imatrix=matrix)
    for kind in types:
        if not soft:
            write_modelfile(tmp / f"{stem}-{kind}.gguf", *chat)
        if reference is not None:
            _say(f"verifying {stem}-{kind}.gguf in llama.cpp" + (f" after {soft}" if soft else ""))
            rows.append(verify_gguf(tmp, f"{stem}-{kind}.gguf", kind, reference, "; ".join(notes[kind]),
                                    soft_prompt=soft))
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


def phone_files(model_dir: Path, tokenizer, tmp: Path, work: Path, formats, ctx: int,
                reference) -> list[Verification]:
    """executorch-<type>/ folders and model-<type>.litertlm bundles, each verified in its runtime."""
    from edgetune.export import phone

    chat = phone.chat_reference(model_dir, tokenizer) if reference is not None else None
    rows = []
    for kind in formats.executorch:
        from edgetune.export.executorch import export_executorch, verify_executorch

        folder = tmp / f"executorch-{kind}"
        _say(f"writing {folder.name}/model.pte with ExecuTorch (minutes)")
        note = export_executorch(model_dir, folder, kind, ctx, phone.stop_ids(tokenizer))
        if reference is not None:
            _say(f"verifying {folder.name}/model.pte in ExecuTorch")
            rows.append(verify_executorch(folder, kind, reference, chat, note))
    if formats.litert:
        from edgetune.export.litert import discard, export_litert, verify_litert

        names = ", ".join(f"model-{kind}.litertlm" for kind in formats.litert)
        _say(f"converting for LiteRT-LM (minutes), then writing {names}")
        notes = export_litert(model_dir, tmp, work, formats.litert, ctx)
        discard(work)
        for kind in formats.litert if reference is not None else []:
            _say(f"verifying model-{kind}.litertlm in LiteRT and LiteRT-LM")
            rows.append(verify_litert(tmp, kind, reference, chat, notes[kind]))
    return rows
