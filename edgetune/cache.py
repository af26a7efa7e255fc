"""`edgetune cache list|clear`: the models edgetune converted from GGUF, and hub downloads.

Converted checkpoints live in CACHE/models/NAME-KEY, KEY being a hash of the GGUF's content
(`models.content_key`), so they are shared by every environment that uses the same file. Hub
snapshots live in CACHE/hub. Nothing here imports torch.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetune.config import option
from edgetune.errors import EdgetuneError


@dataclass(frozen=True)
class CacheConfig:
    action: str | None = option(None, "list: show what the cache holds; clear: remove it",
                                choices=("list", "clear"), positional=True, metavar="list|clear")
    cache_dir: str | None = option(None, "the cache folder (default: $EDGETUNE_CACHE or "
                                   "~/.cache/edgetune)")

    def __post_init__(self) -> None:
        if self.action is None:
            raise EdgetuneError("say what to do: edgetune cache list, or edgetune cache clear")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def entries(root: Path) -> list[tuple[Path, str]]:
    """(folder, what it is) for each converted model and hub snapshot in the cache."""
    from edgetune.models import SOURCE_FILE

    found = []
    models = root / "models"
    for entry in sorted(models.iterdir()) if models.is_dir() else []:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            source = json.loads((entry / SOURCE_FILE).read_text()).get("gguf", "?")
        except (OSError, ValueError):
            source = "incomplete conversion"
        found.append((entry, f"from {source}"))
    hub = root / "hub"
    for entry in sorted(hub.iterdir()) if hub.is_dir() else []:
        if entry.is_dir() and entry.name.startswith("models--"):
            found.append((entry, "hub download " + entry.name.removeprefix("models--").replace("--", "/")))
    return found


def main(config: CacheConfig) -> int:
    from edgetune import folders
    from edgetune.models import cache_root
    from edgetune.units import format_size

    root = cache_root(config.cache_dir)
    found = entries(root)
    if config.action == "list":
        total = 0
        for path, what in found:
            size = folder_bytes(path)
            total += size
            print(f"{format_size(size):>10}  {path.name}  ({what})")
        print(f"edgetune: {len(found)} cached models, {format_size(total)} in {root}")
        return 0
    freed = 0
    for path, _ in found:  # the entry's lock: a process converting it holds that
        with folders.sibling_lock(path, f"cache entry {path}", verb="edgetune cache clear"):
            freed += folder_bytes(path)
            folders.remove_tree(path)
    models = root / "models"
    for leftover in models.iterdir() if models.is_dir() else []:  # killed conversions
        found_pid = folders.LEFTOVER.search(leftover.name)
        if found_pid and not folders.pid_alive(int(found_pid.group(2))):
            shutil.rmtree(leftover, ignore_errors=True)
    print(f"edgetune: removed {len(found)} cached models ({format_size(freed)}) from {root}")
    return 0
