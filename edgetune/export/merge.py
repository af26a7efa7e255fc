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


def load_adapter(adapter_dir: Path) -> dict[str, LoraPair]:
    """The adapter's LoRA pairs keyed by base weight name (e.g. model.layers.0.mlp.up_proj.weight)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise EdgetuneError(f"{weights} cannot be read ({exc}): the file is truncated or damaged; "
                            "export an earlier checkpoint, or resume training to write it again") from None
    sides: dict[str, dict[str, object]] = {}
    for key, tensor in tensors.items():
        found = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if found is None:
            raise EdgetuneError(f"{adapter_dir}: unexpected adapter tensor {key}; "
                                "only lora_A/lora_B weights of linear layers are supported")
        sides.setdefault(found["module"], {})[found["side"]] = tensor
    pairs = {}
    for module, ab in sides.items():
        if set(ab) != {"A", "B"}:
            raise EdgetuneError(f"{adapter_dir}: {module} has lora_{next(iter(ab))} but not its pair")
        rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        pairs[module + ".weight"] = LoraPair(module, ab["A"], ab["B"], rank, alpha,
                                             bool(config.get("use_rslora")))
    return pairs


def merged_tensor(name: str, weight, pair: LoraPair | None):
    """`weight` in fp32 plus the pair's update, refusing a NaN or infinite result."""
    import torch

    result = weight.to(torch.float32)
    if pair is not None:
        a, b = pair.a.to(torch.float32), pair.b.to(torch.float32)
        if tuple(result.shape) != (b.shape[0], a.shape[1]):
            raise EdgetuneError(f"adapter for {name}: B @ A is {b.shape[0]}x{a.shape[1]} but the base "
                                f"weight is {'x'.join(map(str, result.shape))}: wrong base model?")
        result = result + pair.scale * (b @ a)
    if not torch.isfinite(result).all():
        raise EdgetuneError(f"merged tensor {name} has NaN or infinite values: the adapter or base "
                            "is broken (diverged training?); not exporting it")
    return result


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter as a plain HF folder at `out_dir` (fp32 model.safetensors, same config)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    pairs = load_adapter(adapter_dir)
    config = read_config(base_dir)
    files = weight_files(base_dir)
    layout: dict[str, tuple[Path, list[int]]] = {}
    for file in files:
        with open_weights(file) as f:
            for key in f.keys():
                layout[key] = (file, list(f.get_slice(key).get_shape()))
    _check_pairs(pairs, layout, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = {key: shape for key, (_, shape) in layout.items()}

    def tensors():
        for file in files:
            with open_weights(file) as f:
                for key in f.keys():
                    yield key, merged_tensor(key, f.get_tensor(key), pairs.get(key))

    write_safetensors(out_dir / "model.safetensors", shapes, tensors())
    for name in COPIED:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _check_pairs(pairs: dict[str, LoraPair], layout: dict, config: dict) -> None:
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
