"""Checkpoints that are whole or absent: written under a temporary name, then renamed.

A checkpoint folder `checkpoints/step-000050/` holds the adapter (PEFT format) and `state.pt`:
optimizer, scheduler, RNG states, the data position and the step. The final adapter goes into the run
folder itself, so the run folder is a standard PEFT adapter folder.
"""

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from edgetune.runfiles import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS

ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)  # config last: it marks the adapter whole
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model: Any, extra: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the `keep` most recent."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({"step": step, "rng": rng_state(), **extra}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in completed(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def completed(run_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load(path: Path, model: Any) -> dict:
    """Load a checkpoint's adapter weights into `model` and return its state dict."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    return torch.load(path / "state.pt", weights_only=False)


def save_adapter(run_dir: Path, model: Any) -> None:
    """Write the final adapter into the run folder, replacing each file atomically."""
    tmp = run_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ADAPTER_FILES:
        os.replace(tmp / name, run_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)
