"""Folders edgetune writes: which ones it made, who is writing them, what a crash left, and space.

Everything here is torch-free and used by train, export, quickstart and the model cache alike:
- `check_replaceable` tells a folder edgetune made (by its marker file) from one a user owns, so that
  `--force` never deletes the user's files;
- `locked` holds an OS file lock (`fcntl.flock`) while a process writes a folder: the kernel drops it
  when the process dies, so a lock left by a killed process never blocks;
- `remove_leftovers` clears the temporary files of an interrupted write, under that lock;
- `require_space` and `disk_errors` turn a full or read-only disk into one `edgetune:` line.
"""

import errno
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.runfiles import EXPORT_CONFIG, LOCK, QUICKSTART_RESULT, REPORT, RUN_CONFIG
from edgetune.units import format_size

LOCK_FILE = LOCK
# The files that say a folder is edgetune's (and so may be replaced), with what they mark.
RUN_MARKERS = {RUN_CONFIG: "run settings"}
EXPORT_MARKERS = {EXPORT_CONFIG: "export settings", REPORT: "export report"}
QUICKSTART_MARKERS = {QUICKSTART_RESULT: "quick start result"}
# Names of an interrupted write: `.X.tmp-PID` (being written), `.X.old-PID` (being replaced),
# `.X.del-PID` (being removed). Each is renamed into place or away in one step, so a crash leaves
# at most these behind; they are hidden, so a user's own `notes.tmp-1` never matches.
LEFTOVER = re.compile(r"^\..+\.(tmp|old|del)-(\d+)$")
_DISK_ERRORS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def say(message: str) -> None:
    """A status line on stderr, where messages about the run (not its results) go."""
    print(f"edgetune: {message}", file=sys.stderr, flush=True)


def inspect_output(folder: Path, markers: dict[str, str], flag: str = "--output") -> str:
    """"missing", "empty" or "ours" (it holds one of `markers`) for an output folder.

    `markers` maps a file name to what it marks ("edgetune_run.yaml": "training run"). Anything else
    (a user's own folder, a file) raises, naming what was found, so that `--force` never deletes a
    user's files.
    """
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        raise EdgetuneError(f"{flag} {folder} is a file, not a folder: choose another {flag}")
    entries = sorted(p.name for p in folder.iterdir() if not _ours(p.name))
    if not entries:
        return "empty"
    if any((folder / name).is_file() for name in markers):
        return "ours"
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    kinds = " or ".join(sorted({f"{what} ({name})" for name, what in markers.items()}))
    raise EdgetuneError(f"{flag} {folder} holds {shown}, which edgetune did not make (no {kinds}): "
                        f"refusing to replace it; choose another {flag}")


def _is_lock(name: str) -> bool:
    return name == LOCK_FILE or name.endswith(".edgetune-lock")


def _ours(name: str) -> bool:
    """A lock or leftover name: not content, so a folder holding only these counts as empty."""
    return _is_lock(name) or LEFTOVER.search(name) is not None


def clear(folder: Path) -> None:
    """Empty `folder` but keep the folder and lock files (so the locks stay held)."""
    for entry in folder.iterdir():
        if _is_lock(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_tree(path: Path) -> None:
    """Remove a folder by first renaming it aside, so that a crash never leaves it half-deleted."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name.lstrip('.')}.del-{os.getpid()}")  # hidden, like all leftovers
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(folder: Path, prefix: str = "") -> list[Path]:
    """Remove the temporary files of interrupted writes in `folder` (names starting with `prefix`).

    Call it only while holding the folder's lock: then no live edgetune process is writing them.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        found = LEFTOVER.search(entry.name)
        if found is None or not entry.name.startswith(prefix) or int(found.group(2)) == os.getpid():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ""
    pid, _, verb = text.partition(" ")
    if not pid.isdigit():
        return "another edgetune process"
    return f"PID {pid}" + (f" ({verb})" if verb else "")


@contextmanager
def locked(lock_file: Path, what: str, wait: bool = False, verb: str = "") -> Iterator[None]:
    """Hold an exclusive OS lock on `lock_file` (created if needed) for the duration of the block.

    The lock file holds the holder's PID and verb, so a second process can say who has it. It is
    removed on release; the inode check after locking makes that safe against a racing process that
    opened the file just before it was removed.
    """
    with disk_errors(lock_file.parent):
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise EdgetuneError(f"{what} is in use by {_holder(lock_file)}: wait for it to "
                                    "finish or stop it first") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file while we waited: lock the new one
    try:  # the PID only serves the message of a process that finds the folder locked
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {verb}".strip().encode())
    except OSError:
        pass
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(fd)


def folder_lock(folder: Path, what: str, verb: str = ""):
    """The lock of a folder that stays in place (a run folder): a lock file inside it."""
    return locked(folder / LOCK_FILE, what, verb=verb)


def sibling_lock(path: Path, what: str, wait: bool = False, verb: str = ""):
    """The lock of a folder published by renaming (an export, a cache entry): a file beside it."""
    return locked(path.with_name(f".{path.name}.edgetune-lock"), what, wait=wait, verb=verb)


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds `folder` (or its nearest existing parent)."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def require_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start a write of `needed` bytes into `folder` that cannot fit."""
    free = free_bytes(folder)
    if needed + 2**20 > free:
        raise EdgetuneError(f"not enough space in {folder} for {what}: it needs {format_size(needed)}, "
                            f"{format_size(free)} is free; free some space or write elsewhere")


def disk_error(exc: BaseException) -> str | None:
    """What an error says about the disk (full, read-only, no permission), else None.

    safetensors and torch report a failed write in their own exception types, with the OS error
    only in the message, so the message is read too.
    """
    code = getattr(exc, "errno", None)
    if code in _DISK_ERRORS:
        return _DISK_ERRORS[code]
    text = str(exc)
    for pattern, reason in (("StorageFull", "no space left"), ("No space left", "no space left"),
                            ("Read-only file system", "read-only file system"),
                            ("Permission denied", "permission denied")):
        if pattern in text:
            return reason
    return None


@contextmanager
def disk_errors(folder: Path, needed: int | None = None, cleanup: Iterable[Path] = ()) -> Iterator[None]:
    """Turn a disk error inside the block into one `edgetune:` line naming `folder`.

    `cleanup` lists temporary paths to remove first, so a failed write does not keep the disk full.
    """
    try:
        yield
    except EdgetuneError:
        raise
    except Exception as exc:
        reason = disk_error(exc)
        if reason is None:
            raise
        for path in map(Path, cleanup):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        need = f"; this write needs {format_size(needed)}" if needed else ""
        free = f", {format_size(free_bytes(folder))} free" if reason == "no space left" else ""
        raise EdgetuneError(f"cannot write in {folder}: {reason}{free}{need}") from None


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folder itself, to the disk."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_errors(path.parent, cleanup=[tmp]):
        tmp.write_text(text)
        os.replace(tmp, path)
