"""GGUF types below 8 bits, made by llama.cpp's own quantizer from the f16 file we wrote.

k-quants work on blocks of 256 values per row; when a model's width is not a multiple of 256
(SmolLM2-135M's 576), llama.cpp quietly falls back to other types for most tensors, so the file is
not really q4_k_m. `quantize` says so in its notes.
"""

import ctypes
from collections import Counter
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.llama import last_line, quiet_native_logs

# Our name -> llama.cpp's LLAMA_FTYPE_* constant name.
LLAMA_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
_K_BLOCK = 256


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EdgetuneError("GGUF types below 8 bits need llama-cpp-python: "
                            "pip install llama-cpp-python") from None
    return llama_cpp


def k_quant_note(out_type: str, widths: list[int], written: Counter) -> str:
    """The report note for a k-quant over rows whose length is not a multiple of 256, else ''.

    `written` counts the types llama.cpp actually gave the file's matrices.
    """
    if "_k" not in out_type:
        return ""
    odd = sorted({w for w in widths if w % _K_BLOCK})
    if not odd:
        return ""
    used = ", ".join(f"{n} {kind.lower()}" for kind, n in written.most_common())
    return (f"row length {', '.join(map(str, odd))} is not a multiple of 256: llama.cpp fell back "
            f"from {out_type} for most tensors (matrices written as: {used})")


def quantize(f16_path: Path, out_path: Path, out_type: str, threads: int = 0) -> list[str]:
    """Quantize the f16 GGUF at `f16_path` to `out_type` (see LLAMA_TYPES); returns report notes."""
    from gguf import GGUFReader

    if out_type not in LLAMA_TYPES:
        raise EdgetuneError(f"unknown llama.cpp quantization {out_type}; "
                            f"supported: {', '.join(LLAMA_TYPES)}")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_TYPES[out_type])
    params.nthread = threads
    with quiet_native_logs() as log:
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(),
                                                ctypes.byref(params))
        if status != 0 or not Path(out_path).is_file():
            detail = last_line(log())
            raise EdgetuneError(f"llama.cpp could not quantize {f16_path.name} to {out_type} "
                                f"(status {status}{': ' + detail if detail else ''})")
    widths = [int(t.shape[0]) for t in GGUFReader(f16_path).tensors if len(t.shape) > 1]
    written = Counter(t.tensor_type.name for t in GGUFReader(out_path).tensors if len(t.shape) > 1)
    note = k_quant_note(out_type, widths, written)
    return [note] if note else []
