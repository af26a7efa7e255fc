"""Merge a PEFT LoRA adapter into its full-precision base, one tensor at a time.

W' = W + scale * B @ A with scale = alpha / r (alpha / sqrt(r) for rsLoRA). Only one base tensor and
its adapter pair are in memory at once, and model.safetensors is streamed to disk, so merging fits in
the RAM of a small device. Merged weights are written in fp32: rounding them back to a bf16 base
would throw away most of a small LoRA update.
"""

import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.hf import open_weights, read_config, weight_files
from edgetune.runfiles import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Files copied unchanged from the base folder into the merged one (weights are rewritten).
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
          "merges.txt", "tokenizer.model", "added_tokens.json", "edgetune_source.json")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: A is [r, in], B is [out, r]; rank and alpha as given in the run."""

    module: str  # the base module name, e.g. model.layers.0.self_attn.q_proj
    a: "object"  # torch.Tensor, kept untyped so importing this module does not import torch
    b: "object"
    rank: int
    alpha: float
    rslora: bool

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def update(self):
        """The dense fp32 update scale * B @ A this pair adds to its base weight."""
        import torch

        return self.scale * (self.b.to(torch.float32) @ self.a.to(torch.float32))


def is_adapter_dir(path: Path) -> bool:
    """Whether `path` holds a PEFT adapter (config and safetensors weights)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refusing adapter kinds this merge cannot reproduce exactly."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgetuneError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: cannot read it ({exc})") from None
    if not isinstance(config, dict):
        raise EdgetuneError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise EdgetuneError(f"{adapter_dir}: adapter type {config.get('peft_type')} is not supported; "
                            "only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise EdgetuneError(f"{adapter_dir}: DoRA adapters are not supported; retrain without use_dora")
    if config.get("modules_to_save"):
        raise EdgetuneError(f"{adapter_dir}: adapters with modules_to_save "
                            f"({config['modules_to_save']}) are not supported")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name or its dotted suffix."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter on disk, read one module at a time (only the file's header up front)."""

    def __init__(self, adapter_dir: Path):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(adapter_dir)
        self.config = read_adapter_config(adapter_dir)
        weights = self.dir / ADAPTER_WEIGHTS
        try:
            self._file = safe_open(str(weights), framework="pt")
            keys = list(self._file.keys())
        except (OSError, SafetensorError) as exc:
            raise EdgetuneError(f"{weights} cannot be read ({exc}): the file is truncated or damaged; "
                                "export an earlier checkpoint, or resume training to write it again") \
                from None
        self._keys = self._pair_keys(keys)

    def _pair_keys(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """{base weight name: {"A": key, "B": key}}, refusing tensors that are not LoRA pairs."""
        sides: dict[str, dict[str, str]] = {}
        for key in keys:
            found = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
            if found is None:
                raise EdgetuneError(f"{self.dir}: unexpected adapter tensor {key}; "
                                    "only lora_A/lora_B weights of linear layers are supported")
            sides.setdefault(found["module"] + ".weight", {})[found["side"]] = key
        for name, ab in sides.items():
            if set(ab) != {"A", "B"}:
                raise EdgetuneError(f"{self.dir}: {name.removesuffix('.weight')} has "
                                    f"lora_{next(iter(ab))} but not its pair")
        return sides

    @property
    def names(self) -> list[str]:
        """Base weight names the adapter changes, e.g. model.layers.0.mlp.up_proj.weight."""
        return sorted(self._keys)

    def shape(self, name: str) -> tuple[int, int]:
        """(out, in) of the base weight `name` as the adapter's B @ A sees it."""
        rows = self._file.get_slice(self._keys[name]["B"]).get_shape()[0]
        return rows, self._file.get_slice(self._keys[name]["A"]).get_shape()[1]

    def rank(self, name: str) -> int:
        module = name.removesuffix(".weight")
        return int(_pattern_value(self.config.get("rank_pattern"), module, self.config["r"]))

    def pair(self, name: str) -> LoraPair:
        module = name.removesuffix(".weight")
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.config["lora_alpha"])
        return LoraPair(module, self._file.get_tensor(self._keys[name]["A"]),
                        self._file.get_tensor(self._keys[name]["B"]), self.rank(name), float(alpha),
                        bool(self.config.get("use_rslora")))


def load_adapter(adapter_dir: Path) -> dict[str, LoraPair]:
    """The adapter's LoRA pairs keyed by base weight name (e.g. model.layers.0.mlp.up_proj.weight)."""
    adapter = Adapter(adapter_dir)
    return {name: adapter.pair(name) for name in adapter.names}


def merged_tensor(name: str, weight, update=None):
    """`weight` in fp32 plus a dense update (or nothing), refusing a NaN or infinite result."""
    import torch

    result = weight.to(torch.float32)
    if update is not None:
        if tuple(result.shape) != tuple(update.shape):
            raise EdgetuneError(f"adapter for {name}: its update is {'x'.join(map(str, update.shape))} "
                                f"but the base weight is {'x'.join(map(str, result.shape))}: "
                                "wrong base model?")
        result = result + update.to(torch.float32)
    if not torch.isfinite(result).all():
        raise EdgetuneError(f"merged tensor {name} has NaN or infinite values: the adapter or base "
                            "is broken (diverged training?); not exporting it")
    return result


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter as a plain HF folder at `out_dir` (fp32 model.safetensors, same config)."""
    pairs = load_adapter(adapter_dir)
    return write_merged(base_dir, out_dir, {name: pair.update for name, pair in pairs.items()})


def write_merged(base_dir: Path, out_dir: Path, updates: dict[str, Callable[[], object]]) -> Path:
    """Write base + updates as a plain HF folder at `out_dir` (fp32 model.safetensors, same config).

    `updates` maps a base weight name to a function returning its dense update, called only when
    that weight is written, so one update is in memory at a time.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_config(base_dir)
    files = weight_files(base_dir)
    layout: dict[str, tuple[Path, list[int]]] = {}
    for file in files:
        with open_weights(file) as f:
            for key in f.keys():
                layout[key] = (file, list(f.get_slice(key).get_shape()))
    _check_pairs(updates, layout, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = {key: shape for key, (_, shape) in layout.items()}

    def tensors():
        for file in files:
            with open_weights(file) as f:
                for key in f.keys():
                    update = updates[key]() if key in updates else None
                    yield key, merged_tensor(key, f.get_tensor(key), update)

    write_safetensors(out_dir / "model.safetensors", shapes, tensors())
    for name in COPIED:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _check_pairs(pairs: Collection[str], layout: dict, config: dict) -> None:
    missing = sorted(set(pairs) - set(layout))
    if missing:
        raise EdgetuneError(f"adapter modifies {missing[0]}, which the base model does not have: "
                            "was the adapter trained on another model?")
    tied = config.get("tie_word_embeddings", False)
    if tied and any(k in pairs for k in ("lm_head.weight", "model.embed_tokens.weight")):
        raise EdgetuneError("adapter changes a tied embedding/output weight; merging would untie them. "
                            "Retrain without lm_head in --target-modules")


def write_safetensors(path: Path, shapes: dict[str, list[int]], tensors) -> None:
    """Stream fp32 `tensors` (name, tensor pairs in any order of `shapes`) into one safetensors file.

    safetensors' own writer wants every tensor in memory at once; its format is simple enough (a JSON
    header of offsets, then raw little-endian data) to write one tensor at a time instead.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    start = 8 + len(blob)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        out.truncate(start + offset)
        for name, tensor in tensors:
            out.seek(start + header[name]["data_offsets"][0])
            out.write(tensor.contiguous().numpy().astype("<f4", copy=False).tobytes())
