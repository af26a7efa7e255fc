"""Merge a PEFT adapter into its full-precision base, one tensor at a time.

What each method does to one base weight W (PEFT's own merge, `merge_and_unload`, is the reference
the tests hold these to):
- LoRA: W + s * B @ A, s = alpha / r (rsLoRA: alpha / sqrt(r)).
- AdaLoRA: the same with A's rows scaled by the singular values E, and s = alpha / (r0 + 1e-5) for the
  initial rank r0 (PEFT's ranknum, which pruning keeps); pruned ranks are already gone from the file.
- DoRA: m / ||W + s * B @ A|| * (W + s * B @ A), the norm taken per output row.
- IA3: W's output rows times the learned vector (and the bias with them), or for feed-forward layers
  its input columns.
Only one base tensor and its update are in memory at once, and model.safetensors is streamed to
disk, so merging fits in the RAM of a small device. Merged weights are written in fp32: rounding them
back to a bf16 base would throw away most of a small update.
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
from edgetune.methods import method_of
from edgetune.runfiles import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Files copied unchanged from the base folder into the merged one (weights are rewritten).
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
          "merges.txt", "tokenizer.model", "added_tokens.json", "edgetune_source.json")
_PEFT_PREFIX = "base_model.model."
# lora_A/lora_B (with .weight for LoRA's linear layers; AdaLoRA's are bare parameters), lora_E,
# DoRA's lora_magnitude_vector and IA3's ia3_l.
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[ABE]|lora_magnitude_vector|ia3_l)"
                  r"(?:\.default)?(?:\.weight)?$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight$")  # a plain LoRA
ADALORA_EPS = 1e-5  # PEFT's AdaLoRA divides by (ranknum + 1e-5)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: A is [r, in], B is [out, r]; rank and alpha as given in the run."""

    module: str  # the base module name, e.g. model.layers.0.self_attn.q_proj
    a: "object"  # torch.Tensor, kept untyped so importing this module does not import torch
    b: "object"
    rank: int
    alpha: float
    rslora: bool
    initial_rank: int | None = None  # AdaLoRA: the rank its scale divides by (A holds A * E)

    @property
    def scale(self) -> float:
        if self.initial_rank is not None:
            return self.alpha / (self.initial_rank + ADALORA_EPS)
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def update(self):
        """The dense fp32 update scale * B @ A this pair adds to its base weight."""
        import torch

        return self.scale * (self.b.to(torch.float32) @ self.a.to(torch.float32))

    def apply(self, weight):
        a, b = self.a.to(weight.dtype), self.b.to(weight.dtype)
        _require_shape(self.module, "B @ A", (b.shape[0], a.shape[1]), weight.shape)
        return weight + self.scale * (b @ a)


@dataclass(frozen=True)
class DoraUpdate:
    """DoRA: a LoRA pair and the magnitude each output row of the result is rescaled to."""

    pair: LoraPair
    magnitude: "object"  # [out]

    def apply(self, weight):
        import torch

        updated = self.pair.apply(weight)
        _require_shape(self.pair.module, "the magnitude vector", tuple(self.magnitude.shape),
                       (weight.shape[0],))
        norm = torch.linalg.norm(updated, dim=1)
        return (self.magnitude.to(weight.dtype) / norm)[:, None] * updated


@dataclass(frozen=True)
class Ia3Update:
    """IA3: a learned vector scaling the layer's output rows, or for feed-forward its inputs."""

    module: str
    vector: "object"  # [out, 1] or, feed-forward, [1, in]: PEFT's ia3_l

    @property
    def feedforward(self) -> bool:
        return self.vector.shape[0] == 1 and self.vector.shape[1] != 1

    def apply(self, weight):
        if weight.dim() == 1:  # the bias of an output-scaled layer scales with its rows
            _require_shape(self.module, "the IA3 vector", (self.vector.numel(),), tuple(weight.shape))
            return weight * self.vector.reshape(-1).to(weight.dtype)
        axis = 1 if self.feedforward else 0
        _require_shape(self.module, "the IA3 vector", (self.vector.numel(),), (weight.shape[axis],))
        return weight * self.vector.to(weight.dtype)


def _require_shape(module: str, what: str, got: tuple, base: tuple) -> None:
    if tuple(got) != tuple(base):
        raise EdgetuneError(f"adapter for {module}: {what} is {'x'.join(map(str, got))} but the base "
                            f"weight needs {'x'.join(map(str, base))}: wrong base model?")


def is_adapter_dir(path: Path) -> bool:
    """Whether `path` holds a PEFT adapter (config and safetensors weights)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refusing adapter kinds edgetune does not know."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgetuneError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: cannot read it ({exc})") from None
    if not isinstance(config, dict):
        raise EdgetuneError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: expected a JSON object")
    try:
        method_of(config)
    except EdgetuneError as exc:
        raise EdgetuneError(f"{adapter_dir}: {exc}") from None
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


def _adapter_tensors(adapter_dir: Path) -> dict[str, dict[str, object]]:
    """{module: {part: tensor}} of the adapter file, refusing tensors no method here makes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise EdgetuneError(f"{weights} cannot be read ({exc}): the file is truncated or damaged; "
                            "export an earlier checkpoint, or resume training to write it again") from None
    parts: dict[str, dict[str, object]] = {}
    for key, tensor in tensors.items():
        found = _KEY.match(key.removeprefix(_PEFT_PREFIX))
        if found is None:
            raise EdgetuneError(f"{adapter_dir}: unexpected adapter tensor {key}; only the updates of "
                                "linear layers (LoRA, DoRA, AdaLoRA, IA3) can be merged")
        parts.setdefault(found["module"], {})[found["part"]] = tensor
    return parts


def _pair(adapter_dir: Path, config: dict, module: str, parts: dict) -> LoraPair:
    if not {"lora_A", "lora_B"} <= set(parts):
        have = next(iter(parts))
        raise EdgetuneError(f"{adapter_dir}: {module} has {have} but not the lora_A/lora_B pair")
    a, b = parts["lora_A"], parts["lora_B"]
    if config.get("peft_type") == "ADALORA":  # pruned to its rank pattern: the rank is A's rows
        initial = int(config["init_r"])
        alpha = float(config["lora_alpha"]) if config["lora_alpha"] > 0 else float(initial)
        return LoraPair(module, a * parts["lora_E"], b, int(a.shape[0]), alpha, False, initial)
    rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return LoraPair(module, a, b, rank, alpha, bool(config.get("use_rslora")))


class Adapter:
    """A PEFT LoRA or rsLoRA adapter on disk, read one module at a time (only the file's header up
    front): what `edgetune merge` combines, as plain B @ A pairs."""

    def __init__(self, adapter_dir: Path):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(adapter_dir)
        self.config = read_adapter_config(adapter_dir)
        chosen = method_of(self.config)
        if chosen.name not in ("lora", "rslora"):
            kind = ("DoRA adapters are" if chosen.name == "dora"
                    else f"adapter type {self.config.get('peft_type')} is")
            raise EdgetuneError(f"{self.dir}: {kind} not supported here: only LoRA and rsLoRA adapters "
                                "are plain low-rank pairs that combine")
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


def load_updates(adapter_dir: Path) -> dict[str, object]:
    """What the adapter does to each base weight, keyed by its name (model.layers.0.mlp.up_proj.weight):
    a LoraPair, DoraUpdate or Ia3Update, each with `apply(weight)`."""
    config = read_adapter_config(adapter_dir)
    chosen = method_of(config)
    if not chosen.folds:
        raise EdgetuneError(f"{adapter_dir}: {chosen.title} learns inputs, not weights: it cannot be "
                            "merged into the base model")
    updates: dict[str, object] = {}
    for module, parts in _adapter_tensors(adapter_dir).items():
        if chosen.name == "ia3":
            updates[module + ".weight"] = Ia3Update(module, parts["ia3_l"])
            continue
        pair = _pair(adapter_dir, config, module, parts)
        dora = parts.get("lora_magnitude_vector")
        updates[module + ".weight"] = pair if dora is None else DoraUpdate(pair, dora)
    return updates


def load_adapter(adapter_dir: Path) -> dict[str, LoraPair]:
    """The adapter's LoRA pairs keyed by base weight name, for formats that carry plain low-rank pairs
    (LoRA, rsLoRA, AdaLoRA)."""
    updates = load_updates(adapter_dir)
    if not all(isinstance(u, LoraPair) for u in updates.values()):
        chosen = method_of(read_adapter_config(adapter_dir))
        raise EdgetuneError(f"{adapter_dir}: {chosen.title} is not a pair of low-rank matrices per "
                            "layer; only LoRA, rsLoRA and AdaLoRA adapters are")
    return updates


def merged_tensor(name: str, weight, update=None):
    """`weight` in fp32 with an update applied (or nothing), refusing a NaN or infinite result. The
    update is a dense tensor to add, or an update object (LoraPair, DoraUpdate, Ia3Update)."""
    import torch

    result = weight.to(torch.float32)
    if update is not None:
        if not isinstance(update, torch.Tensor):
            result = update.apply(result)
        elif tuple(result.shape) != tuple(update.shape):
            raise EdgetuneError(f"adapter for {name}: its update is {'x'.join(map(str, update.shape))} "
                                f"but the base weight is {'x'.join(map(str, result.shape))}: "
                                "wrong base model?")
        else:
            result = result + update.to(torch.float32)
    if not torch.isfinite(result).all():
        raise EdgetuneError(f"merged tensor {name} has NaN or infinite values: the adapter or base "
                            "is broken (diverged training?); not exporting it")
    return result


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter as a plain HF folder at `out_dir` (fp32 model.safetensors, same config)."""
    updates = load_updates(adapter_dir)
    with_bias = [k for k, u in updates.items() if isinstance(u, Ia3Update) and not u.feedforward]
    if with_bias:  # an output-scaled IA3 layer's bias scales with its rows (as PEFT's IA3 merge)
        present = set(_layout(weight_files(Path(base_dir))))
        updates |= {bias: updates[k] for k in with_bias
                    if (bias := k.removesuffix(".weight") + ".bias") in present}
    return write_merged(base_dir, out_dir, {name: (lambda u=u: u) for name, u in updates.items()})


def write_merged(base_dir: Path, out_dir: Path, updates: dict[str, Callable[[], object]]) -> Path:
    """Write base + updates as a plain HF folder at `out_dir` (fp32 model.safetensors, same config).

    `updates` maps a base tensor name to a function returning its update (a dense tensor to add, or
    an update object, see merged_tensor), called only when that tensor is written, so one update is
    in memory at a time.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_config(base_dir)
    files = weight_files(base_dir)
    layout = _layout(files)
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


def _layout(files: list[Path]) -> dict[str, tuple[Path, list[int]]]:
    """{tensor name: (file, shape)} of the base checkpoint, from the files' headers."""
    layout = {}
    for file in files:
        with open_weights(file) as f:
            for key in f.keys():
                layout[key] = (file, list(f.get_slice(key).get_shape()))
    return layout


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
