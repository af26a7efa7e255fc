"""Resident memory as the kernel reports it, and the guard that stops a run before the budget."""

import os
from pathlib import Path


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
    """Stops training once the peak RSS comes within one step's growth of the budget.

    After each step it compares the peak so far plus the largest growth of the peak seen in one step
    (at least `margin` of the budget) with the budget, so a run stops one step early rather than late.
    """

    def __init__(self, budget_bytes: int, margin: float = 0.03):
        self.budget, self.margin = budget_bytes, margin
        self.last_peak = peak_rss()
        self.largest_growth = 0
        self.message = ""

    def should_stop(self) -> bool:
        peak = peak_rss()
        self.largest_growth = max(self.largest_growth, peak - self.last_peak)
        self.last_peak = peak
        headroom = max(self.largest_growth, int(self.margin * self.budget))
        if peak + headroom <= self.budget:
            return False
        self.message = (f"peak memory {peak / 2**30:.2f} GiB is within {headroom / 2**30:.2f} GiB "
                        f"of the --ram budget {self.budget / 2**30:.2f} GiB")
        return True
