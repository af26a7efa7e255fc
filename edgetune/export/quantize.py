"""GGUF types below 8 bits, made by llama.cpp's own quantizer from the f16 file we wrote.

An importance matrix (imatrix.py) goes to llama.cpp through `llama_model_quantize_params.imatrix`, an
array of (tensor name, mean x^2 per input channel), which llama.cpp weighs each row's rounding error
by, exactly as `llama-quantize --imatrix` does.

k-quants and i-quants work on blocks of 256 values per row; when a model's width is not a multiple of
256 (SmolLM2-135M's 576), llama.cpp quietly falls back to 32-value block types for those tensors, so
the file is not really q4_k_m. `quantize` says so in its notes.
"""

import ctypes
from collections import Counter
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.llama import last_line, quiet_native_logs

# llama.cpp's file types below 8 bits (llama-quantize's list less ternary and MoE-only types); the
# constant is LLAMA_FTYPE_MOSTLY_<NAME>.
LLAMA_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s",
               "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "iq3_m", "iq3_s", "iq3_xs",
               "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
# Types llama.cpp refuses to make without an importance matrix (its tensor_requires_imatrix).
NEEDS_IMATRIX = ("q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m",
                 "iq1_s")
_K_BLOCK = 256


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EdgetuneError("GGUF types below 8 bits need llama-cpp-python: "
                            "pip install llama-cpp-python") from None
    return llama_cpp


def k_quant_note(out_type: str, widths: list[int], written: Counter) -> str:
    """The report note for a 256-block type over rows whose length is not a multiple of 256, else ''.

    `written` counts the types llama.cpp actually gave the file's matrices.
    """
    if "_k" not in out_type and (not out_type.startswith("iq") or out_type == "iq4_nl"):
        return ""
    odd = sorted({w for w in widths if w % _K_BLOCK})
    if not odd:
        return ""
    used = ", ".join(f"{n} {kind.lower()}" for kind, n in written.most_common())
    return (f"row length {', '.join(map(str, odd))} is not a multiple of 256: llama.cpp fell back "
            f"from {out_type} for those tensors (matrices written as: {used})")


def _imatrix_array(imatrix: dict):
    """llama.cpp's llama_model_imatrix_data array for {name: mean x^2}, ended by a NULL name.

    Returns (array, keep-alive list): the float buffers must outlive the quantize call.
    """
    import numpy as np

    llama_cpp = _llama_cpp()
    entry = llama_cpp.llama_model_imatrix_data
    buffers = [(name.encode(), np.ascontiguousarray(values, dtype=np.float32))
               for name, values in imatrix.items()]
    array = (entry * (len(buffers) + 1))()
    for i, (name, values) in enumerate(buffers):
        array[i].name = name
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    return array, buffers


def quantize(f16_path: Path, out_path: Path, out_type: str, threads: int = 0,
             imatrix: dict | None = None) -> list[str]:
    """Quantize the f16 GGUF at `f16_path` to `out_type` (see LLAMA_TYPES), weighting rounding
    errors by `imatrix` ({GGUF weight name: mean x^2 per input channel}) when given; returns notes."""
    from gguf import GGUFReader

    if out_type not in LLAMA_TYPES:
        raise EdgetuneError(f"unknown llama.cpp quantization {out_type}; "
                            f"supported: {', '.join(LLAMA_TYPES)}")
    if out_type in NEEDS_IMATRIX and not imatrix:
        raise EdgetuneError(f"llama.cpp makes {out_type} only with an importance matrix: "
                            "pass --imatrix FILE or export a training run (its data calibrates one)")
    llama_cpp = _llama_cpp()
    if imatrix and not hasattr(llama_cpp, "llama_model_imatrix_data"):
        raise EdgetuneError("quantizing with an importance matrix needs llama-cpp-python 0.3.36 or "
                            "newer: pip install -U llama-cpp-python")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}")
    params.nthread = threads
    if imatrix:
        array, _alive = _imatrix_array(imatrix)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
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
