"""What this machine computes natively, read without importing torch."""

import platform
from pathlib import Path


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has bf16 instructions
    return "avx512_bf16" in flags or "amx_bf16" in flags
