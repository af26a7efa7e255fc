"""The teacher's work kept on disk: computed once, reused by every run with the same teacher, data and
settings, and trusted only when its checksum matches.

An entry is `KEY.npz` (or `KEY.jsonl`) beside `KEY.json`, which records the data file's sha256 and
what the entry was made from. Both are written to temporary names and renamed, the data file first,
so a killed writer leaves no entry a reader would take; a data file whose checksum does not match
(a bit flipped, a file cut short) is said, removed and made again.
"""

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from edgetune import folders
from edgetune.models import cache_root

VERSION = 1  # part of every key: raise it when the teacher's output would come out different


def folder(cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / "distill"


def key(*parts: Any) -> str:
    """A key over JSON-able parts (the teacher's content key, token ids, settings)."""
    digest = hashlib.sha256(f"edgetune-distill-{VERSION}".encode())
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"|")
    return digest.hexdigest()[:20]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(root: Path, name: str, suffix: str) -> tuple[bytes, dict] | None:
    """(data, its record) of entry `name`, or None when there is none or it fails its checksum."""
    data_file, meta_file = root / f"{name}{suffix}", root / f"{name}.json"
    if not meta_file.is_file():
        return None  # never written, or its writer died before the record: not an entry
    try:
        meta = json.loads(meta_file.read_text())
        data = data_file.read_bytes()
    except (OSError, ValueError):
        data, meta = b"", {}
    if _sha256(data) != meta.get("sha256"):
        print(f"edgetune: teacher cache {data_file} is corrupted (checksum mismatch): rebuilding it",
              flush=True)
        data_file.unlink(missing_ok=True)
        meta_file.unlink(missing_ok=True)
        return None
    return data, meta


def write(root: Path, name: str, suffix: str, data: bytes, meta: dict) -> Path:
    """Write entry `name` (data, then its record with the checksum), each temp then rename."""
    with folders.disk_errors(root):
        root.mkdir(parents=True, exist_ok=True)
    with folders.sibling_lock(root / name, f"teacher cache entry {name}", wait=True,
                              verb="edgetune distill"), folders.disk_errors(root):
        folders.remove_leftovers(root, prefix=f".{name}")
        target = root / f"{name}{suffix}"
        tmp = root / f".{name}{suffix}.tmp-{os.getpid()}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        record = {**meta, "sha256": _sha256(data)}
        folders.write_text_atomic(root / f"{name}.json", json.dumps(record, indent=2) + "\n")
    return target


def pack_arrays(arrays: dict) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> dict:
    import numpy as np

    with np.load(io.BytesIO(data)) as found:
        return {name: found[name] for name in found.files}
