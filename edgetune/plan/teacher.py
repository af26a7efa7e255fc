"""Memory of a distillation teacher in llama.cpp: pure arithmetic over its GGUF header and size.

    teacher = GGUF file (mapped whole) + KV cache at the context + logits of every position
              + llama.cpp's scratch and runtime

The top-k pass asks for the logits of every position (llama-cpp-python's `logits_all`), which it
keeps as a context x vocabulary fp32 array: for a large vocabulary that term rivals a small model's
weights. `edgetune distill` closes the teacher before the student loads, so a run's peak is the
larger of this and the student's plan (edgetune.plan.memory), never their sum.
"""

from dataclasses import dataclass

from edgetune.constants import PREFILL_BATCH
from edgetune.devices.selection import KV_BYTES, RUNTIME_BASE
from edgetune.shape import ModelShape
from edgetune.units import format_size


@dataclass(frozen=True)
class TeacherMemory:
    weights: int
    kv_cache: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.overhead

    def describe(self) -> str:
        return (f"{format_size(self.total)} (weights {format_size(self.weights)} + KV cache "
                f"{format_size(self.kv_cache)} + logits {format_size(self.logits)} + runtime "
                f"{format_size(self.overhead)})")


def teacher_memory(shape: ModelShape, file_bytes: int, ctx: int) -> TeacherMemory:
    """Predicted resident memory of a `file_bytes` GGUF teacher of `shape` with a `ctx` context."""
    kv = shape.kv_bytes(ctx, KV_BYTES["gguf"], windowed=True)
    logits = ctx * shape.vocab * 4
    scratch = PREFILL_BATCH * (shape.vocab + 4 * shape.hidden + 2 * shape.intermediate) * 4
    return TeacherMemory(file_bytes, kv, logits, RUNTIME_BASE["gguf"] + scratch)
