"""Resident memory as the kernel reports it, the guard that stops a run before the budget, and the
allocator settings that keep freed memory from piling up in the heap."""

import ctypes
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgetune.constants import LEAN_MMAP_THRESHOLD

# glibc's mallopt parameter, and the thresholds used: blocks from this size up are mapped on their own
# and unmapped when freed. 32 MiB is the ceiling glibc's own adaptive threshold reaches.
M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD = 128 * 1024
TRAIN_MMAP_THRESHOLD = 32 * 2**20


def _glibc() -> Any:
    """The C library when it is glibc (the allocator these settings are for), else None."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def released_promptly():
    """Return every freed block of 128 KiB or more to the OS at once while loading.

    Quantizing or converting a checkpoint frees one large temporary per weight. glibc keeps freed
    blocks in its heaps, scattered among live ones, and how much it keeps depends on which thread
    freed what, so the loading peak varied widely between identical runs. With each large block mapped
    on its own, freeing it unmaps it. Afterwards the threshold is fixed at 32 MiB, where glibc's
    adaptive one ends up, because mapping every activation of a training step on its own is slower
    (docs/qlora.md).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, TRAIN_MMAP_THRESHOLD)
        libc.malloc_trim(0)


@contextmanager
def lean_heap(enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Map every block of 1 MiB or more on its own while training, so that freeing it unmaps it.

    With gradient checkpointing (the memory-first setting) the heap, not the saved activations, was
    most of a step's growth: freed activation-sized blocks stay in it between small live ones and
    later, larger requests extend it. Every large block then costs fresh pages, which is slower, so
    training without checkpointing keeps the fast 32 MiB threshold (docs/qlora.md has both sides).

    Yields the function to call after each optimizer step: it hands the heap's free pages back
    (`malloc_trim`), which the small blocks of one step (LoRA gradients, optimizer temporaries) leave
    behind.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield lambda: None
        return
    libc.mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD)
    libc.malloc_trim(0)
    try:
        yield lambda: libc.malloc_trim(0)
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, TRAIN_MMAP_THRESHOLD)


def _status_kb(key: str) -> int | None:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss() -> int:
    """Current resident set size in bytes (what the OOM killer sees)."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size so far (VmHWM), in bytes."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryGuard:
    """Stops training once the peak RSS has passed the budget, or would pass it at the next step.

    The first steps build the working set (optimizer state, activations, the heap's share of them),
    which is what the planner predicts, so the peak's growth over them is not projected forward: a
    run planned for the budget stops only when its peak passes the budget. From the
    `settle_steps + 1`-th step on, what the peak still grows by in one step is memory that keeps
    growing, and the guard stops once the next step's growth would take it past the budget.
    """

    def __init__(self, budget_bytes: int, settle_steps: int = 2):
        self.budget, self.settle_steps = budget_bytes, settle_steps
        self.checks, self.peak, self.largest_growth = 0, 0, 0
        self.message = ""

    def should_stop(self) -> bool:
        peak = peak_rss()
        self.checks += 1
        self.message = ""
        if self.checks > self.settle_steps:
            self.largest_growth = max(self.largest_growth, peak - self.peak)
        self.peak = peak
        gib, budget = peak / 2**30, self.budget / 2**30
        if peak > self.budget:
            self.message = f"peak memory {gib:.2f} GiB passed the --ram budget {budget:.2f} GiB"
        elif peak + self.largest_growth > self.budget:
            self.message = (f"peak memory {gib:.2f} GiB still grows by up to "
                            f"{self.largest_growth / 2**30:.2f} GiB a step and would pass the --ram "
                            f"budget {budget:.2f} GiB at the next")
        return bool(self.message)
