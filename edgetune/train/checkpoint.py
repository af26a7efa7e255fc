"""Checkpoints that are whole or absent: written under a temporary name, flushed, then renamed.

A checkpoint folder `checkpoints/step-000050/` holds the adapter (PEFT format) and the training state
(optimizer, scheduler, RNG states, data position, step) as `state.safetensors` + `state.json` (see
statefile.py: no pickle). The final adapter goes into the run folder itself, so the run folder is a
standard PEFT adapter folder. Every replacement renames the old folder aside before the new one
takes its name, so a crash at any instant leaves the last whole checkpoint in place; what it leaves
besides (hidden `.tmp-PID`, `.old-PID`, `.del-PID` names) is removed at the next start.
"""

import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from edgetune import folders
from edgetune.runfiles import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS, TOKENIZER
from edgetune.signals import deferred
from edgetune.train import statefile

ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)  # config last: it marks the adapter whole
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_JSON_ROOM = 2**16  # the JSON side of a checkpoint, generously


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adapter_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save(run_dir: Path, step: int, model: Any, extra: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the `keep` most recent (0: keep all)."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    state = {"step": step, "rng": rng_state(), **extra}
    needed = adapter_bytes(model) + statefile.tensor_bytes(state) + _JSON_ROOM
    with deferred(), folders.disk_errors(root, needed), _removed_on_error(tmp):
        root.mkdir(exist_ok=True)
        folders.require_space(root, needed, f"the step-{step} checkpoint")
        tmp.mkdir()
        model.save_pretrained(tmp)
        statefile.save(tmp, state)
        folders.fsync_tree(tmp)
        old = root / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        folders.fsync_dir(root)
        folders.remove_tree(old)
        for stale in completed(run_dir)[:-keep] if keep > 0 else []:
            folders.remove_tree(stale)
    return final


@contextmanager
def _removed_on_error(tmp: Path) -> Iterator[None]:
    """Remove a half-written temporary folder when its write fails, so it cannot fill the disk."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def completed(run_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name)
             and (p / ADAPTER_FILES[0]).is_file()
             and ((p / statefile.TREE).is_file() or (p / statefile.LEGACY).is_file())]
    return sorted(found, key=step_of)


def micro_batches(path: Path) -> int | None:
    """Micro-batches per optimizer step (ranks x gradient accumulation) of checkpoint `path`; None
    for a checkpoint written before this was recorded."""
    import json

    try:
        value = json.loads((path / statefile.TREE).read_text()).get("micro_batches")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def load(path: Path, model: Any) -> dict:
    """Load a checkpoint's adapter weights into `model` and return its training state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = statefile.load(path)  # first: a refused state file must stop the run before anything
    set_peft_model_state_dict(model, load_file(path / ADAPTER_FILES[0]))
    return state


def save_adapter(run_dir: Path, model: Any, tokenizer: Any) -> None:
    """Write the final adapter and tokenizer into the run folder, replacing each atomically."""
    tmp = run_dir / f".adapter.tmp-{os.getpid()}"
    needed = adapter_bytes(model) + _JSON_ROOM
    with deferred(), folders.disk_errors(run_dir, needed), _removed_on_error(tmp):
        folders.require_space(run_dir, needed, "the adapter")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp / TOKENIZER)
        folders.fsync_tree(tmp)
        for name in ADAPTER_FILES:
            os.replace(tmp / name, run_dir / name)
        old = run_dir / f".{TOKENIZER}.old-{os.getpid()}"
        if (run_dir / TOKENIZER).exists():
            (run_dir / TOKENIZER).rename(old)
        (tmp / TOKENIZER).rename(run_dir / TOKENIZER)
        folders.fsync_dir(run_dir)
        folders.remove_tree(old)
        folders.remove_tree(tmp)
