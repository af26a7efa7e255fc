"""Memory sizes as users type them.

Every unit is binary: `8gb`, `8GB`, `8G` and `8GiB` all mean 8 * 2**30 bytes, the way RAM is sold
and the way `free -h` reports it.
"""

import re

from edgetune.errors import EdgetuneError

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as `8gb`, `8G`, `8GiB`, `512MB` or `1.5g` (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise EdgetuneError(f"cannot read size {text!r}: write it like 8gb, 8G, 8GiB or 512mb")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(n_bytes: float) -> str:
    """A byte count as GiB or MiB with one decimal, for tables and messages."""
    if abs(n_bytes) >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"
