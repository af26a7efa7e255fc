"""Which export fits a device: memory at a context length, and decode speed from memory bandwidth.

Pure arithmetic over a model's shape (from config.json) and a device profile; no torch.

memory  = weights at the quantization + KV cache at `ctx` tokens + runtime overhead
tok/s   = peak bandwidth x efficiency / bytes read per decoded token

Decoding one token reads every weight once (the embedding only one row) and the whole KV cache, so
on CPUs and small boards it is bound by memory bandwidth, not arithmetic. The KV cache is counted at
the full context: the prediction is for the end of a long conversation, the slowest point. Layers
with sliding-window attention (Gemma 3's local layers) keep only the window in llama.cpp's cache,
plus one prompt batch (its `n_ubatch`); onnxruntime-genai keeps the whole context for every layer.
"""

from dataclasses import dataclass
from pathlib import Path

from edgetune.constants import PREFILL_BATCH
from edgetune.devices.profiles import Profile, get, load_profiles
from edgetune.errors import EdgetuneError
from edgetune.shape import ModelShape, shape_from_config, shape_from_model_dir
from edgetune.units import format_size

# Bits per weight, scales included. GGUF: ggml's block layouts (q8_0: 32 int8 + one f16 scale per
# block = 8.5; q6_K 6.5625; q4_K 4.5; the _M mixes keep some tensors at q6_K, measured over llama
# models). ONNX: MatMulNBits blocks of 32 with one fp32 scale each (8 + 1, 4 + 1). ExecuTorch: torchao's
# 8-bit weights carry one fp32 scale per output row (about 8.1 bits at a width of 576), its 4-bit weights
# one per group of 32 (4 + 1). LiteRT: ai-edge-quantizer's per-channel 8 and 4 bits.
BITS_PER_WEIGHT = {
    "gguf": {"q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.5},
    "onnx": {"int8": 9.0, "int4": 5.0},
    "onnx-generic": {"int8": 9.0, "int4": 5.0},
    "executorch": {"8da8w": 8.1, "8da4w": 5.0},
    "litert": {"int8": 8.0, "int4": 4.0},
}
# Files written but never chosen by --target (the quantized ones fit where these do): their weights'
# own widths, for checking an explicit choice against a device.
UNQUANTIZED_BITS = {"fp32": 32, "f16": 16, "bf16": 16}
# KV cache element size: llama.cpp keeps f16; onnxruntime on CPU keeps the fp32 of the graph's I/O, and
# so do the static caches of the ExecuTorch and LiteRT files.
KV_BYTES = {"gguf": 2, "onnx": 4, "onnx-generic": 4, "executorch": 4, "litert": 4}
# Process, runtime libraries and allocator slack, measured as RSS of a loaded tiny model. LiteRT-LM:
# 70 MiB over a bare Python process for its engine answering with a tiny bundle. ExecuTorch's Python
# runtime loads torch, so its figure is the 10 MiB its runner and a tiny program add to that process
# plus its libraries (18 MiB on disk).
RUNTIME_BASE = {"gguf": 64 * 2**20, "onnx": 128 * 2**20, "onnx-generic": 128 * 2**20,
                "executorch": 32 * 2**20, "litert": 70 * 2**20}
# Runtimes whose cache holds only the window for sliding-window layers.
WINDOWED_KV = {"gguf"}


def shape_from_folder(model_dir: Path) -> ModelShape:
    """The shape of an HF model folder, from its config.json."""
    return shape_from_model_dir(model_dir)


def as_shape(shape) -> ModelShape:
    """A ModelShape from itself, a config.json dict or a model folder."""
    if isinstance(shape, ModelShape):
        return shape
    if isinstance(shape, dict):
        return shape_from_config(shape)
    return shape_from_folder(Path(shape))


@dataclass(frozen=True)
class Choice:
    """One export format and quantization on one device, with its predicted cost."""

    format: str  # gguf, onnx, onnx-generic
    quant: str
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    tokens_per_s: float

    @property
    def name(self) -> str:
        return f"{self.format}:{self.quant}"

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def describe(self) -> str:
        return (f"{self.name}: {format_size(self.total_bytes)} "
                f"(weights {format_size(self.weights_bytes)} + KV cache {format_size(self.kv_cache_bytes)}"
                f" + runtime {format_size(self.overhead_bytes)}), about {self.tokens_per_s:.0f} tok/s")


def predict(profile: Profile, shape, ctx: int, fmt: str, quant: str) -> Choice:
    """Memory and decode speed of `shape` as `fmt:quant` on `profile` with a `ctx`-token cache."""
    shape = as_shape(shape)
    bits = BITS_PER_WEIGHT[fmt].get(quant) or UNQUANTIZED_BITS[quant]
    stored_bits, output_bits = _embedding_bits(fmt, quant, shape.tied, bits)
    weights = (shape.linear_params * bits + shape.token_embedding_params * stored_bits) / 8
    kv = shape.kv_bytes(ctx, KV_BYTES[fmt], fmt in WINDOWED_KV)
    scratch = PREFILL_BATCH * (shape.vocab + 4 * shape.hidden + 2 * shape.intermediate) * 4
    overhead = RUNTIME_BASE[fmt] + scratch
    # Per decoded token: every block weight and the output projection, plus the whole cache.
    read = (shape.linear_params * bits + shape.token_embedding_params * output_bits) / 8 + kv
    bandwidth = profile.memory_bandwidth_gbs * 1e9 * profile.bandwidth_efficiency
    return Choice(fmt, quant, int(weights), int(kv), int(overhead), bandwidth / read)


def _embedding_bits(fmt: str, quant: str, tied: bool, bits: float) -> tuple[float, float]:
    """Bits per vocab x hidden element stored for the embedding and output projection together, and
    bits read per element of the output projection when decoding a token."""
    if fmt in ("gguf", "litert"):
        return bits * (1 if tied else 2), bits
    if fmt == "executorch":
        # torchao quantizes the output projection (a Linear) but not the embedding, which stays fp32.
        return 32 + bits, bits
    # ONNX: MatMulNBits quantizes the output projection (a MatMul) but the embedding's Gather stays
    # fp32. A tied matrix is shared instead: quantized by the model builder at int4, left in fp32 by
    # our int8 build and by the generic export (see export/onnx_genai.py and onnx_generic.py).
    if tied:
        return (bits, bits) if (fmt, quant) == ("onnx", "int4") else (32, 32)
    return 32 + bits, bits


@dataclass(frozen=True)
class TargetFit:
    """What runs on one device at one context: the best fitting choice per format, or why none fits."""

    device: Profile
    ctx: int
    choices: tuple[Choice, ...]  # best fitting quantization per format, preferred format first
    smallest: Choice  # the least memory any format and quantization needs (for the refusal)

    @property
    def fits(self) -> bool:
        return bool(self.choices)

    def summary(self) -> str:
        usable = format_size(self.device.usable_bytes)
        if self.fits:
            best = self.choices[0]
            return f"{self.device.name} (one app may use {usable}), context {self.ctx}: {best.describe()}"
        return (f"does not fit {self.device.name} at context {self.ctx}: the smallest export, "
                f"{self.smallest.describe()}, is more than the {usable} one app may use")


def fits(profile_name: str, shape, ctx: int) -> TargetFit:
    """Which exports of `shape` fit `profile_name` with a `ctx`-token context (never raises for size).

    `shape` is a ModelShape, a config.json dict or a model folder.
    Within each format the largest quantization that fits wins, 8-bit first.
    """
    if ctx < 1:
        raise EdgetuneError(f"context length must be at least 1 token, got {ctx}")
    profile = get(profile_name)
    return _fit(profile, as_shape(shape), ctx)


def _fit(profile: Profile, shape: ModelShape, ctx: int) -> TargetFit:
    choices, smallest = [], None
    for fmt in profile.formats:
        fitting = None
        for quant in BITS_PER_WEIGHT[fmt]:  # best quality first
            choice = predict(profile, shape, ctx, fmt, quant)
            if smallest is None or choice.total_bytes < smallest.total_bytes:
                smallest = choice
            if fitting is None and choice.total_bytes <= profile.usable_bytes:
                fitting = choice
        if fitting is not None:
            choices.append(fitting)
    return TargetFit(profile, ctx, tuple(choices), smallest)


def choose_export(profile_name: str, model_dir: Path, ctx: int,
                  unavailable: dict[str, str] | None = None) -> list[str]:
    """The export to write for a device, e.g. ["gguf:q8_0"] or ["executorch:8da8w"].

    The device's most preferred runtime whose format fits, at the largest quantization that fits
    (8-bit first); `fits()` has the alternatives. `unavailable` maps formats this installation cannot
    write to the reason (a missing optional extra): those are passed over, saying so. Prints the
    prediction. Raises EdgetuneError naming a shorter context or a larger device when nothing fits.
    """
    shape = shape_from_folder(model_dir)
    target = fits(profile_name, shape, ctx)
    if not target.fits:
        raise EdgetuneError(refusal(target, shape))
    unavailable = unavailable or {}
    usable = [c for c in target.choices if c.format not in unavailable]
    for choice in target.choices[:target.choices.index(usable[0]) if usable else None]:
        print(f"edgetune: {choice.name} fits {profile_name} but {unavailable[choice.format]}")
    if not usable:
        raise EdgetuneError(f"nothing {profile_name} runs can be written here: "
                            + "; ".join(f"{c.name} {unavailable[c.format]}" for c in target.choices))
    print(f"edgetune: {profile_name} (one app may use {format_size(target.device.usable_bytes)}), "
          f"context {ctx}: {usable[0].describe()}")
    return [usable[0].name]


def check_choices(profile_name: str, model_dir: Path, ctx: int, names: list[str]) -> None:
    """Formats named explicitly with --target (e.g. "executorch:8da4w"): each must fit the device at
    `ctx`, or the one line names the first that does not, what it needs and the context that fits."""
    profile, shape = get(profile_name), shape_from_folder(model_dir)
    for name in names:
        fmt, _, quant = name.partition(":")
        if fmt not in BITS_PER_WEIGHT or quant not in {**BITS_PER_WEIGHT[fmt], **UNQUANTIZED_BITS}:
            continue  # not a file a device runs (e.g. an adapter)
        choice = predict(profile, shape, ctx, fmt, quant)
        if choice.total_bytes > profile.usable_bytes:
            room = profile.usable_bytes - predict(profile, shape, 0, fmt, quant).total_bytes
            longest = max(room, 0) // shape.kv_bytes_per_token(KV_BYTES[fmt]) // 256 * 256
            hint = (f"; --ctx {longest} fits" if longest >= 256 else
                    "; it does not fit at any context: choose a smaller type")
            raise EdgetuneError(f"{choice.describe()}: does not fit {profile_name} at context {ctx}, "
                                f"which gives one app {format_size(profile.usable_bytes)}{hint}")
        print(f"edgetune: {profile_name}, context {ctx}: {choice.describe()}")


def max_context(profile: Profile, shape: ModelShape) -> int:
    """The longest context (a multiple of 256) at which some export fits `profile`, 0 if none."""
    best = 0
    for fmt in profile.formats:
        quant = list(BITS_PER_WEIGHT[fmt])[-1]
        fixed = predict(profile, shape, 0, fmt, quant).total_bytes
        room = profile.usable_bytes - fixed
        fit = lambda ctx: shape.kv_bytes(ctx, KV_BYTES[fmt], fmt in WINDOWED_KV) <= room  # noqa: E731
        low, high = 0, 2**24  # the cache grows with the context: the last multiple of 256 that fits
        while low < high:
            mid = (low + high + 256) // 512 * 256
            low, high = (mid, high) if fit(mid) else (low, mid - 256)
        best = max(best, low)
    return int(best)


def refusal(target: TargetFit, shape: ModelShape) -> str:
    """The one-line error when nothing fits: what it needs, and the context or device that would work."""
    message = (f"the model {target.summary()}")
    hints = []
    ctx = max_context(target.device, shape)
    if ctx >= 256:
        hints.append(f"a context of at most {ctx} tokens (--ctx {ctx})")
    larger = [p for p in load_profiles().values()
              if p.name != target.device.name and _fit(p, shape, target.ctx).fits]
    if larger:
        device = min(larger, key=lambda p: p.usable_bytes)
        hints.append(f"a device such as {device.name} ({format_size(device.usable_bytes)} usable)")
    if not hints:
        return message + "; no known device runs it at any context: choose a smaller model"
    return message + "; try " + " or ".join(hints)

