"""llama.cpp through llama-cpp-python: loading a GGUF (with an adapter), its logits, its decode speed.

llama.cpp's C code prints to stderr directly; `quiet_native_logs` keeps that off the screen and hands
the text back, because its last lines explain a failed load better than the Python exception does.
"""

import contextlib
import os
import sys
import tempfile
import time
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


def load_llama(path: Path, n_ctx: int, lora: Path | None = None, logits_all: bool = True):
    """A llama-cpp-python model over `path` (and a LoRA adapter GGUF), with llama.cpp's logging off."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise EdgetuneError("checking or running GGUF files needs llama-cpp-python: "
                            "pip install llama-cpp-python") from None
    adapter = f" with adapter {Path(lora).name}" if lora else ""
    if lora:  # llama.cpp's own refusal of another architecture's adapter is only a log line
        from edgetune.models import gguf_metadata

        kinds = [gguf_metadata(Path(f), ("general.architecture",)).get("general.architecture")
                 for f in (lora, path)]
        if None not in kinds and kinds[0] != kinds[1]:
            raise EdgetuneError(f"llama.cpp cannot load {Path(path).name}{adapter}: {Path(lora).name} "
                                f"is a {kinds[0]} adapter; {Path(path).name} is {kinds[1]}")
    with quiet_native_logs():  # some context warnings bypass verbose=False
        try:
            llm = Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                        lora_path=str(lora) if lora else None)
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's "did not load"
            raise EdgetuneError(f"llama.cpp cannot load {Path(path).name}{adapter}: {exc}") from None
    # llama-cpp-python 0.3 checks the adapter handle against None, but a failed load returns a NULL
    # pointer, so a mismatched adapter would be dropped silently.
    if lora and not getattr(llm, "_lora_adapter", True):
        llm.close()
        raise EdgetuneError(f"llama.cpp cannot load {Path(path).name}{adapter}: the adapter's tensors "
                            "do not fit this model (was it made for another base?)")
    return llm


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


def gguf_logits(path: Path, ids: list[int], lora: Path | None = None,
                soft_prompt=None) -> tuple["object", float]:
    """(next-token logits [len(ids) - 1, vocab], decode tokens/s) of a GGUF file in llama.cpp, after
    the `soft_prompt` embeddings [n, hidden] when given."""
    import numpy as np

    n = 0 if soft_prompt is None else len(soft_prompt)
    llm = load_llama(path, n_ctx=n + len(ids) + DECODE_TOKENS + 16, lora=lora)
    try:
        if soft_prompt is not None:
            prepend_embeddings(llm, soft_prompt)
        llm.eval(ids)
        logits = np.array(llm.scores[n:n + len(ids) - 1], dtype=np.float32)
        speed = _decode_speed(llm, ids)
    finally:
        llm.close()
    return logits, speed
