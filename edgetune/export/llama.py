"""llama.cpp through llama-cpp-python: loading a GGUF (with an adapter), its logits, its decode speed.

llama.cpp's C code prints to stderr directly; `quiet_native_logs` keeps that off the screen and hands
the text back, because its last lines explain a failed load better than the Python exception does.
"""

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from edgetune.errors import EdgetuneError

DECODE_TOKENS = 32


@contextlib.contextmanager
def quiet_native_logs():
    """Keep what llama.cpp's C code prints on stderr off the screen; yields a function that returns it.

    Its lines explain a failed load (e.g. an adapter tensor of the wrong shape), so callers put the
    last of them into their error message instead of throwing them away.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield lambda: (log.seek(0), log.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def load_llama(path: Path, n_ctx: int, lora: Path | None = None, logits_all: bool = True,
               adapters: Sequence[tuple[Path, float]] = ()):
    """A llama-cpp-python model over `path`, with llama.cpp's logging off.

    `lora` is one adapter GGUF at scale 1; `adapters` is any number of (adapter GGUF, scale) pairs,
    applied together: llama.cpp adds each adapter's scale * alpha / r * B @ A to every layer it adapts.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise EdgetuneError("checking or running GGUF files needs llama-cpp-python: "
                            "pip install llama-cpp-python") from None
    adapters = [(Path(p), float(s)) for p, s in adapters] + ([(Path(lora), 1.0)] if lora else [])
    _check_adapter_architectures(Path(path), [p for p, _ in adapters])
    with quiet_native_logs():  # some context warnings bypass verbose=False
        try:
            llm = Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False)
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's "did not load"
            raise EdgetuneError(f"llama.cpp cannot load {Path(path).name}: {exc}") from None
    if adapters:
        try:
            attach_adapters(llm, adapters)
        except EdgetuneError as exc:
            llm.close()
            raise EdgetuneError(f"llama.cpp cannot load {Path(path).name} with {exc}") from None
    return llm


def _check_adapter_architectures(path: Path, adapters: list[Path]) -> None:
    """Refuse an adapter made for another architecture: llama.cpp's own refusal is only a log line."""
    if not adapters:
        return
    from edgetune.models import gguf_metadata

    base = gguf_metadata(path, ("general.architecture",)).get("general.architecture")
    for adapter in adapters:
        kind = gguf_metadata(adapter, ("general.architecture",)).get("general.architecture")
        if None not in (kind, base) and kind != base:
            raise EdgetuneError(f"llama.cpp cannot load {path.name} with adapter {adapter.name}: "
                                f"{adapter.name} is a {kind} adapter; {path.name} is {base}")


def attach_adapters(llm, adapters: list[tuple[Path, float]]) -> None:
    """Load adapter GGUFs onto `llm`'s model and set them, with their scales, on its context.

    llama-cpp-python's Llama takes one `lora_path`; llama.cpp itself takes any number of adapters
    (llama_set_adapters_lora), so they are loaded through its C API. The model owns each loaded
    adapter and frees it with itself.
    """
    import ctypes

    import llama_cpp

    handles = []
    for adapter, _ in adapters:
        with quiet_native_logs() as native_log:
            handle = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter).encode())
            said = last_line(native_log())
        if not handle:  # a failed load is a NULL pointer, which ctypes does not turn into None
            raise EdgetuneError(f"adapter {adapter.name}: the adapter's tensors do not fit this model "
                                "(was it made for another base?)"
                                + (f"; llama.cpp: {said}" if said else ""))
        handles.append(handle)
    scales = [scale for _, scale in adapters]
    if hasattr(llama_cpp, "llama_set_adapters_lora"):  # llama.cpp sets the whole list at once
        array = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        failed = llama_cpp.llama_set_adapters_lora(llm.ctx, array, len(handles),
                                                   (ctypes.c_float * len(scales))(*scales))
    else:  # older releases add one adapter per call
        failed = any(llama_cpp.llama_set_adapter_lora(llm.ctx, h, s) for h, s in zip(handles, scales))
    if failed:
        raise EdgetuneError(f"adapters {', '.join(a.name for a, _ in adapters)}: llama.cpp refused "
                            "to set them on the context")


def prepend_embeddings(llm, embeddings) -> None:
    """Decode `embeddings` [n, hidden] (a soft prompt) at positions 0..n-1 of a fresh context, so that
    the next `llm.eval(tokens)` continues after them, as PEFT puts virtual tokens before the text."""
    import ctypes

    import llama_cpp
    import numpy as np

    n, width = embeddings.shape
    if width != llm.n_embd():
        raise EdgetuneError(f"the soft prompt's vectors have {width} values but this model's embeddings "
                            f"have {llm.n_embd()}: it was trained on another model")
    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # whatever an earlier prompt left in the cache
    for first in range(0, n, llm.n_batch):
        rows = min(llm.n_batch, n - first)
        batch = llama_cpp.llama_batch_init(rows, width, 1)
        try:
            batch.n_tokens = rows
            ctypes.memmove(batch.embd, data[first:].ctypes.data, rows * width * 4)
            for i in range(rows):
                batch.pos[i], batch.n_seq_id[i], batch.logits[i] = first + i, 1, 0
                batch.seq_id[i][0] = 0
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise EdgetuneError(f"llama.cpp could not take the soft prompt's {n} vectors "
                                    f"(context {llm.n_ctx()}); try a larger --ctx")
        finally:
            llama_cpp.llama_batch_free(batch)
    llm.n_tokens = n  # eval() writes the text's tokens after these positions


def _decode_speed(llm, prompt: list[int]) -> float:
    """Greedy decode tokens per second after a short prompt (what a chat user waits on)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt[:8])
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return DECODE_TOKENS / (time.perf_counter() - start)


def gguf_logits(path: Path, ids: list[int], lora: Path | None = None, soft_prompt=None,
                adapters: Sequence[tuple[Path, float]] = ()) -> tuple["object", float]:
    """(next-token logits [len(ids) - 1, vocab], decode tokens/s) of a GGUF file in llama.cpp, with
    one adapter (`lora`) or several with scales (`adapters`), after the `soft_prompt` embeddings
    [n, hidden] when given."""
    import numpy as np

    n = 0 if soft_prompt is None else len(soft_prompt)
    llm = load_llama(path, n_ctx=n + len(ids) + DECODE_TOKENS + 16, lora=lora, adapters=adapters)
    try:
        if soft_prompt is not None:
            prepend_embeddings(llm, soft_prompt)
        llm.eval(ids)
        logits = np.array(llm.scores[n:n + len(ids) - 1], dtype=np.float32)
        speed = _decode_speed(llm, ids)
    finally:
        llm.close()
    return logits, speed
