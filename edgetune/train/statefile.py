"""Training state (optimizer, scheduler, RNG, data position) as safetensors plus JSON: no pickle.

A checkpoint may come from anywhere (a shared folder, a download), and unpickling runs whatever code
the file names. Here tensors go to `state.safetensors` and everything else to `state.json`, whose tree
names each tensor by key; loading either file only parses data. Python values keep their exact type
(int keys of the optimizer's state, tuples such as AdamW's betas) and floats round-trip exactly, so a
resumed run continues bit for bit, for torch's AdamW and bitsandbytes' 8-bit states alike.
"""

import json
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import EdgetuneError

TENSORS = "state.safetensors"
TREE = "state.json"
LEGACY = "state.pt"  # written by earlier versions; read with torch's safe unpickler only
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def _encode(value: Any, tensors: dict, seen: dict) -> Any:
    if torch.is_tensor(value):
        # One tensor referenced twice (bitsandbytes shares its quantization maps between
        # parameters) is stored once and comes back shared; safetensors refuses shared memory, so
        # each stored tensor is a copy of its own.
        if id(value) not in seen:
            seen[id(value)] = f"t{len(tensors)}"
            tensors[seen[id(value)]] = value.detach().cpu().clone()
        return {_TENSOR: seen[id(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, seen) for k, v in value.items()}
        for k in value:
            if not isinstance(k, (str, int)):
                raise TypeError(f"state key {k!r} ({type(k).__name__}) cannot be saved")
        return {_ITEMS: [[k, _encode(v, tensors, seen)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, seen) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state value of type {type(value).__name__} cannot be saved")


def _decode(value: Any, tensors: dict) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {k: _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save(folder: Path, state: dict) -> None:
    """Write `state` as `folder/state.safetensors` and `folder/state.json` (the JSON last)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _encode(state, tensors, {})
    save_file(tensors, str(folder / TENSORS))
    (folder / TREE).write_text(json.dumps(tree))


def tensor_bytes(state: Any) -> int:
    """Bytes the tensors of `state` take on disk."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def load(folder: Path) -> dict:
    """The state saved in `folder`; an old `state.pt` is read with `weights_only=True` only."""
    if (folder / TREE).is_file():
        from safetensors.torch import load_file

        try:
            return _decode(json.loads((folder / TREE).read_text()), load_file(folder / TENSORS))
        except (OSError, ValueError, KeyError) as exc:
            raise EdgetuneError(f"checkpoint {folder} is damaged ({exc}); delete it to resume "
                                "from the one before") from None
    try:
        # The safe unpickler accepts tensors and plain containers and refuses every other global,
        # so a crafted file cannot name a function to call.
        return torch.load(folder / LEGACY, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle errors have no common base class beyond Exception
        raise EdgetuneError(f"checkpoint {folder}/{LEGACY} holds more than tensors and plain values "
                            f"({_refused(exc)}); refusing to load it") from None


def _refused(exc: Exception) -> str:
    """The line of torch's unpickling error that names what was refused (e.g. GLOBAL posix.system)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0][:200]
