"""`edgetune export` and `edgetune run` settings: defaults, help text and validation."""

import math
from dataclasses import dataclass
from pathlib import Path

from edgetune.config import option
from edgetune.errors import EdgetuneError
from edgetune.export.quantize import LLAMA_TYPES

GGUF_TYPES = ("f16", "bf16", "q8_0") + LLAMA_TYPES
IMATRIX_MODES = ("auto", "none")
ONNX_TYPES = ("fp32", "int8", "int4")
# ExecuTorch (XNNPACK): fp32, or torchao's 8-bit dynamic activations with 4-bit (groups of 32) or 8-bit
# (per channel) weights. LiteRT: fp32, or ai-edge-quantizer's per-channel 8-bit or 4-bit weights.
EXECUTORCH_TYPES = ("fp32", "8da4w", "8da8w")
LITERT_TYPES = ("fp32", "int8", "int4")


def split_list(value: str | None) -> list[str]:
    """'q8_0, f16' -> ['q8_0', 'f16'] (lower-cased, duplicates dropped, order kept)."""
    items = [v.strip().lower() for v in (value or "").split(",") if v.strip()]
    return list(dict.fromkeys(items))


def _check_types(flag: str, value: str | None, valid: tuple[str, ...]) -> None:
    for item in split_list(value):
        if item not in valid:
            raise EdgetuneError(f"--{flag} {item}: unknown type; valid types: {', '.join(valid)}")


@dataclass(frozen=True)
class ExportConfig:
    run: str | None = option(None, "run folder from `edgetune train` (or a model: HF folder, .gguf, "
                             "built-in name) to export", positional=True, metavar="RUN")
    output: str | None = option(None, "export folder (default: RUN/export)")
    force: bool = option(False, "replace an existing export folder")
    gguf: str | None = option(None, "GGUF types, comma-separated: f16, bf16, q8_0 or any of "
                              "llama.cpp's (q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k, iq4_xs, iq3_xxs, ...; "
                              "docs/export.md lists them)", metavar="TYPES")
    imatrix: str = option("auto", "importance matrix for types below 8 bits: auto (computed from the "
                          "run's training data when there is some, saved as imatrix.gguf), none, "
                          "or an imatrix.gguf FILE made for this model", metavar="auto|none|FILE")
    gguf_adapter: bool = option(False, "also write the LoRA adapter as a llama.cpp GGUF adapter "
                                "(with the f16 base it applies to)")
    onnx: str | None = option(None, f"ONNX precisions, comma-separated: {', '.join(ONNX_TYPES)}",
                              metavar="TYPES")
    onnx_generic: bool = option(False, "ONNX with generic ops only (no onnxruntime contrib ops)")
    executorch: str | None = option(None, "ExecuTorch .pte types for Android and iOS apps, comma-separated: "
                                    f"{', '.join(EXECUTORCH_TYPES)} (needs edgetune[phone])",
                                    metavar="TYPES")
    litert: str | None = option(None, "LiteRT-LM .litertlm types for Android apps, comma-separated: "
                                f"{', '.join(LITERT_TYPES)} (needs edgetune[phone])", metavar="TYPES")
    target: str | None = option(None, "device profile (see `edgetune devices`): choose the formats "
                                "that fit it when no format is given", metavar="DEVICE")
    ctx: int = option(2048, "context length the --target device must hold; also the KV cache length "
                      "of .pte and .litertlm files")
    verify: bool = option(True, "check every file against the torch model and fail past threshold")
    keep_failed: bool = option(False, "when a file fails verification, keep the export in "
                               "OUTPUT.rejected for inspection")
    positions: int = option(256, "held-out next-token positions compared when verifying")
    cache_dir: str | None = option(None, "where GGUF models are cached as HF checkpoints "
                                   "(default: $EDGETUNE_CACHE or ~/.cache/edgetune)")

    def __post_init__(self) -> None:
        if not self.run:
            raise EdgetuneError("nothing to export: pass a run folder, e.g. edgetune export edgetune-run "
                                "--gguf q8_0")
        _check_types("gguf", self.gguf, GGUF_TYPES)
        _check_types("onnx", self.onnx, ONNX_TYPES)
        _check_types("executorch", self.executorch, EXECUTORCH_TYPES)
        _check_types("litert", self.litert, LITERT_TYPES)
        if not (self.gguf_types or self.gguf_adapter or self.onnx_types or self.onnx_generic
                or self.executorch_types or self.litert_types or self.target):
            raise EdgetuneError("no format asked for: pass --gguf q8_0 (types: "
                                f"{', '.join(GGUF_TYPES)}), --gguf-adapter, --onnx, --executorch, "
                                "--litert or --target DEVICE")
        if self.imatrix not in IMATRIX_MODES and not Path(self.imatrix).expanduser().is_file():
            raise EdgetuneError(f"--imatrix {self.imatrix}: no such file; pass auto, none or an "
                                "imatrix.gguf file")
        if self.positions < 1:
            raise EdgetuneError(f"--positions must be at least 1, got {self.positions}")
        if self.ctx < 1:
            raise EdgetuneError(f"--ctx must be at least 1, got {self.ctx}")

    @property
    def gguf_types(self) -> list[str]:
        return split_list(self.gguf)

    @property
    def onnx_types(self) -> list[str]:
        return split_list(self.onnx)

    @property
    def executorch_types(self) -> list[str]:
        return split_list(self.executorch)

    @property
    def litert_types(self) -> list[str]:
        return split_list(self.litert)


@dataclass(frozen=True)
class RunConfig:
    model: str | None = option(None, "GGUF model file to chat with", positional=True,
                               metavar="MODEL.gguf")
    prompt: str | None = option(None, "the user message to answer")
    system: str | None = option(None, "system message (default: the chat template's own, if any)")
    lora: tuple[str, ...] = option((), "GGUF LoRA adapter to apply over the model (from "
                                   "--gguf-adapter), optionally with a scale (default 1); repeat "
                                   "it to stack several: --lora a.gguf:0.7 --lora b.gguf:0.3",
                                   metavar="ADAPTER.gguf[:SCALE]")
    soft_prompt: str | None = option(None, "soft prompt to put before the prompt: the "
                                     "soft-prompt.safetensors that exporting a prompt or P-tuning "
                                     "run writes beside its base-*.gguf", metavar="FILE")
    max_tokens: int = option(256, "most tokens to generate")
    temperature: float = option(0.0, "sampling temperature; 0 always picks the likeliest token")
    ctx: int = option(2048, "context length in tokens")

    def __post_init__(self) -> None:
        if not self.model:
            raise EdgetuneError("no model: pass a .gguf file, e.g. edgetune run export/model-q8_0.gguf "
                                "--prompt 'Hello'")
        if not self.prompt:
            raise EdgetuneError("no prompt: pass --prompt 'your question'")
        if self.max_tokens < 1 or self.ctx < 1:
            raise EdgetuneError("--max-tokens and --ctx must be at least 1")
        if self.temperature < 0:
            raise EdgetuneError(f"--temperature must be 0 or more, got {self.temperature}")
        self.adapters  # noqa: B018 - validates every --lora now, before anything loads

    @property
    def adapters(self) -> list[tuple[str, float]]:
        """(adapter GGUF, scale) for each --lora; a missing scale is 1."""
        return [adapter_and_scale(item) for item in self.lora]


def adapter_and_scale(item: str) -> tuple[str, float]:
    """'a.gguf:0.7' -> ('a.gguf', 0.7); 'a.gguf' -> ('a.gguf', 1.0). Text after the last colon that is
    not a number belongs to the path. A negative scale subtracts the adapter, as in llama.cpp."""
    path, _, tail = item.rpartition(":")
    try:
        scale = float(tail) if path else None
    except ValueError:
        scale = None
    if scale is None:
        return item, 1.0
    if not math.isfinite(scale):
        raise EdgetuneError(f"--lora {item}: the scale must be a finite number, e.g. {path}:0.5")
    return path, scale
