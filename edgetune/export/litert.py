"""LiteRT-LM export: a merged HF folder -> .litertlm bundles for Google's LiteRT-LM runtime (Android).

litert-torch's HF exporter converts the model once into a TFLite program with a prefill and a decode
signature (the KV cache and the attention mask are inputs: the runtime owns them). int8 and int4 are
made from that fp32 program by ai-edge-quantizer, per-channel weights with activations quantized
dynamically by the integer kernels; quantizing takes seconds where converting takes minutes. Each type
is bundled by litert-lm-builder with the tokenizer and the LLM metadata (chat template, stop tokens,
context length) into model-<type>.litertlm.

Two things in the metadata litert-torch writes are fixed before bundling, or LiteRT-LM's Conversation
API answers wrongly or not at all:
- the start token: litert-torch declares the tokenizer's BOS as the start token the runtime prepends
  whenever the rendered template begins with it, but a template that writes it as literal text (ChatML:
  SmolLM2's BOS is <|im_start|>) then gets it twice. It is kept only where the tokenizer adds it itself
  or the template names `bos_token`.
- the chat template: the Conversation API hands the template each message's content as a list of parts
  ([{"type": "text", "text": ...}]); templates written for strings fail on it ("+ operator on
  unsupported types string and sequence"). A preamble turns list contents back into strings first.
"""

import contextlib
import shutil
import sys
import types
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export import phone
from edgetune.export.report import Verification

# type -> ai-edge-quantizer recipe (None: the converted fp32 program as it is)
# int4 in blocks of 32: per-channel 4-bit weights cost SmolLM2-135M most of its quality (docs/phone.md).
RECIPES = {"fp32": None, "int8": "dynamic_wi8_afp32", "int4": "dynamic_wi4b32_afp32"}
PREFILL = 128  # tokens per prefill call (the runtime pads or chunks prompts to it)
# Jinja that rewrites list-of-parts contents to strings before the model's own template runs.
CONTENT_AS_TEXT = (
    "{%- set normalized = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}"
    "{%- set normalized.messages = normalized.messages + [m] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in m['content'] -%}{%- if part['type'] == 'text' -%}"
    "{%- set text.value = text.value + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set normalized.messages = normalized.messages + [{'role': m['role'], 'content': text.value}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = normalized.messages -%}")


def export_litert(model_dir: Path, tmp: Path, work: Path, kinds: list[str], ctx: int) -> dict[str, str]:
    """Write tmp/model-<kind>.litertlm for each kind from one conversion; returns a note per kind."""
    unknown = [k for k in kinds if k not in RECIPES]
    if unknown:
        raise EdgetuneError(f"LiteRT type {unknown[0]!r} is not one of {', '.join(RECIPES)}")
    phone.require("litert")
    config = phone.read_config(model_dir, "litert")
    length = phone.cache_length(config, ctx)
    clock = phone.Clock()
    converted = _convert(model_dir, work / "litert", length)
    clock.lap("conversion")
    metadata = _fixed_metadata(converted, model_dir)
    notes = {}
    for kind in kinds:
        own = phone.Clock()
        program = _quantize(converted / "model.tflite", RECIPES[kind])
        _bundle(tmp / f"model-{kind}.litertlm", program, metadata, converted, kind)
        own.lap("quantizing and bundling" if RECIPES[kind] else "bundling")
        notes[kind] = f"KV cache {length} tokens, prefill {min(PREFILL, length)}; {clock}, {own}"
    return notes


@contextlib.contextmanager
def _tflite_schema_alias():
    """litert-torch's exporter module imports an image model (bonsai_flux2) that imports
    `tensorflow.lite.python.schema_py_generated`, though tensorflow is not among its dependencies.
    ai-edge-litert ships the same generated module: alias it while that import runs, then remove the
    alias (and never when tensorflow itself is installed)."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    import torch._dynamo  # noqa: F401  (imported before the alias exists: it probes for tensorflow)
    from ai_edge_litert import schema_py_generated

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    aliases = {n: types.ModuleType(n) for n in names}
    aliases["tensorflow.lite.python.schema_py_generated"] = schema_py_generated
    sys.modules.update(aliases)
    try:
        yield
    finally:
        for name in aliases:
            sys.modules.pop(name, None)


def _convert(model_dir: Path, out: Path, length: int) -> Path:
    """litert-torch's fp32 conversion into `out` (model.tflite, metadata, tokenizer.json)."""
    with _tflite_schema_alias(), phone.native_output():  # its imports log to stderr
        from litert_torch.generative.export_hf import export as exporter
    out.mkdir(parents=True, exist_ok=True)
    with phone.native_output() as output:  # a progress line per step on stdout, converter logs on stderr
        try:
            exporter.export(model=str(model_dir), output_dir=str(out), quantization_recipe="none",
                            prefill_lengths=[min(PREFILL, length)], cache_length=length,
                            keep_temporary_files=True, bundle_litert_lm=True)
        except Exception as exc:  # the exporter raises many kinds; keep its log for the message
            log = "\n".join("\n".join(output()).splitlines()[-20:])
            raise RuntimeError(f"litert-torch could not convert {model_dir}: {exc}\n{log}") from exc
    for name in ("model.tflite", "llm_metadata.pb", "tokenizer.json"):
        if not (out / name).is_file():
            raise RuntimeError(f"litert-torch wrote no {name} in {out}")
    return out


def _fixed_metadata(converted: Path, model_dir: Path) -> Path:
    """llm_metadata.pb with the start token and chat template fixed (see the module docstring)."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2
    from transformers import AutoTokenizer

    metadata = llm_metadata_pb2.LlmMetadata()
    metadata.ParseFromString((converted / "llm_metadata.pb").read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = tokenizer.chat_template or ""
    if metadata.HasField("start_token") and not needs_start_token(tokenizer, template):
        metadata.ClearField("start_token")
    if template:
        metadata.jinja_prompt_template = CONTENT_AS_TEXT + template
    path = converted / "llm_metadata_fixed.pb"
    path.write_bytes(metadata.SerializeToString())
    return path


def needs_start_token(tokenizer, template: str) -> bool:
    """Whether the runtime must prepend BOS: the tokenizer adds it to plain text, or the template
    writes it through the `bos_token` variable (which LiteRT-LM's template engine leaves empty)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    adds = tokenizer("x")["input_ids"][:1] == [bos]
    return adds or "bos_token" in template


def _quantize(program: Path, recipe: str | None) -> Path:
    if recipe is None:
        return program
    from ai_edge_quantizer import quantizer, recipe as recipes

    out = program.with_name(f"model-{recipe}.tflite")
    with phone.native_output():
        quantize = quantizer.Quantizer(str(program))
        quantize.load_quantization_recipe(getattr(recipes, recipe)())
        quantize.quantize().export_model(str(out), overwrite=True)
    return out


def _bundle(path: Path, program: Path, metadata: Path, converted: Path, kind: str) -> None:
    """model-<kind>.litertlm: metadata, tokenizer and program in LiteRT-LM's container."""
    from litert_lm_builder import litertlm_builder as builder

    with phone.native_output():  # the builder prints what it adds
        bundle = builder.LitertLmFileBuilder()
        bundle.add_system_metadata(builder.Metadata(key="Authors", value="edgetune",
                                                    dtype=builder.DType.STRING))
        bundle.add_llm_metadata(str(metadata))
        if (converted / "executor_metadata.pb").is_file():
            bundle.add_executor_metadata(str(converted / "executor_metadata.pb"))
        bundle.add_hf_tokenizer(str(converted / "tokenizer.json"))
        # LiteRT-LM runs a text decoder's activations in fp16 on CPU unless the bundle asks otherwise:
        # an fp32 file is verified in fp32, so it asks for that.
        bundle.add_tflite_model(str(program), builder.TfLiteModelType.PREFILL_DECODE,
                                prefer_activation_type="fp32" if kind == "fp32" else None)
        with open(path, "wb") as f:
            bundle.build(f)


def verify_litert(tmp: Path, kind: str, reference, chat: phone.Chat | None,
                  note: str = "") -> Verification:
    """Run tmp/model-<kind>.litertlm's program in LiteRT and chat through LiteRT-LM; the report row."""
    from edgetune.export.litert_runtime import run

    path = Path(tmp) / f"model-{kind}.litertlm"
    with phone.native_output():
        result = run(path, reference.ids, chat)
    return phone.verification(path.name, f"litert-lm {kind}", kind, path.stat().st_size, result,
                              reference, chat, note)


def discard(work: Path) -> None:
    """The conversion's intermediate files (an fp32 program as large as the model)."""
    shutil.rmtree(work / "litert", ignore_errors=True)
