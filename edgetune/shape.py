"""A model's shape: the numbers the planner and the device predictions need, read from config.json or
GGUF metadata.

Readers touch only the config file or the GGUF header; no weights are loaded and torch is not imported.
"""

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from edgetune.constants import PREFILL_BATCH
from edgetune.errors import EdgetuneError

# Bytes per element of the dtypes a checkpoint may be stored in (config.json's "dtype"/"torch_dtype").
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the planner knows of a decoder-only transformer; every count is exact, not rounded."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    norms_per_layer: int = 2  # Gemma 2 has four (pre/post attention and feed-forward)
    qk_norm: bool = False  # Qwen3 normalises queries and keys per head
    attention_bias: bool = False  # Qwen2 has biases on q, k and v
    fused: bool = False  # Phi-3 packs q, k, v into one linear layer and gate, up into another
    file_dtype: str = "bfloat16"  # how the checkpoint stores its weights on disk
    sliding_window: int | None = None  # Gemma 3: tokens a local (sliding-window) layer attends to
    sliding_layers: int = 0  # how many of the layers are local
    max_positions: int | None = None  # longest sequence it was built for (max_position_embeddings)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer LoRA adapts in one decoder layer: q, k, v, o, gate, up, down."""
        return list(self._linears)

    @cached_property
    def _linears(self) -> tuple[tuple[int, int], ...]:
        # Cached: the planner's search asks for these thousands of times over the catalogue.
        h, i = self.hidden, self.intermediate
        if self.fused:
            return ((h, self.q_dim + 2 * self.kv_dim), (self.q_dim, h), (h, 2 * i), (i, h))
        return ((h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h),
                (h, i), (h, i), (i, h))

    @cached_property
    def linear_params(self) -> int:
        """Weights of all decoder linear layers: the part 4/8-bit quantization shrinks."""
        return self.layers * sum(a * b for a, b in self._linears)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output layer, counted once when they are tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def small_params(self) -> int:
        """Norm weights and biases: kept in the compute dtype whatever the quantization."""
        per_layer = self.norms_per_layer * self.hidden
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        per_layer += self.q_dim + 2 * self.kv_dim if self.attention_bias else 0
        return self.layers * per_layer + self.hidden  # + the final norm

    @property
    def token_embedding_params(self) -> int:
        """One vocabulary x hidden matrix: the input embedding, or the output layer."""
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.small_params

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Keys and values of every layer for one token of context."""
        return 2 * self.layers * self.kv_dim * element_bytes

    def kv_bytes(self, ctx: int, element_bytes: int, windowed: bool = True) -> int:
        """The KV cache at `ctx` tokens. `windowed`: local layers keep only their window and one
        prompt batch (llama.cpp's sliding-window cache)."""
        if not (windowed and self.sliding_window and self.sliding_layers):
            return self.kv_bytes_per_token(element_bytes) * ctx
        per_layer = 2 * self.kv_dim * element_bytes
        local = min(ctx, self.sliding_window + PREFILL_BATCH)
        return per_layer * ((self.layers - self.sliding_layers) * ctx + self.sliding_layers * local)

    def lora_params(self, rank: int) -> int:
        """A (rank x in) plus B (out x rank) for every adapted linear layer."""
        return self.layers * rank * self._linear_widths

    @cached_property
    def _linear_widths(self) -> int:
        return sum(a + b for a, b in self._linears)


# config.json "model_type" -> per-architecture extras the generic keys do not carry.
_ARCH_EXTRAS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True},
    "gemma2": {"norms_per_layer": 4}, "phi3": {"fused": True}, "smollm3": {}, "olmo2": {"qk_norm": True},
    "gemma3_text": {"norms_per_layer": 4, "qk_norm": True},
}


def head_dim(config: dict) -> int:
    """The size of one attention head in a config.json dict (explicit, or hidden / heads)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """The shape in an HF config.json dict; an architecture it cannot describe raises EdgetuneError."""
    arch = config.get("model_type", "?")
    if arch not in _ARCH_EXTRAS:
        raise EdgetuneError(f"model {name}: architecture {arch!r} is not one the planner knows; "
                            f"known: {', '.join(sorted(_ARCH_EXTRAS))}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise EdgetuneError(f"model {name}: config.json lacks {', '.join(missing)}")
    heads = config["num_attention_heads"]
    extras = dict(_ARCH_EXTRAS[arch])
    if "attention_bias" in config:
        extras["attention_bias"] = bool(config["attention_bias"])
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    sliding = sum(t == "sliding_attention" for t in config.get("layer_types") or [])
    if sliding and config.get("sliding_window"):
        extras.update(sliding_window=config["sliding_window"], sliding_layers=sliding)
    return ModelShape(
        name=name, hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim(config),
        intermediate=config["intermediate_size"], vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        file_dtype=dtype if dtype in DTYPE_BYTES else "bfloat16",
        max_positions=config.get("max_position_embeddings"), **extras)


def shape_from_model_dir(path: str | Path) -> ModelShape:
    """The shape of a local HF model folder, from its config.json alone."""
    from edgetune.hf import read_config

    return shape_from_config(read_config(path), Path(path).name)


# GGUF architecture names -> config.json model_type.
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
              "phi3": "phi3", "mistral": "mistral", "gemma3": "gemma3_text"}


def shape_from_gguf_fields(fields: dict, name: str = "model") -> ModelShape:
    """The shape in GGUF header fields ({key: value}); the vocabulary is the token list's length."""
    arch = fields.get("general.architecture")
    if arch not in _GGUF_ARCH:
        raise EdgetuneError(f"GGUF {name}: architecture {arch!r} is not one the planner knows; "
                            f"known: {', '.join(sorted(_GGUF_ARCH))}")

    def key(suffix: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{suffix}", default)
        if value is None:
            raise EdgetuneError(f"GGUF {name}: header lacks {arch}.{suffix}")
        return value

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    vocab = fields.get(f"{arch}.vocab_size") or fields.get("tokenizer.ggml.tokens.count")
    config = {"model_type": _GGUF_ARCH[arch], "hidden_size": hidden,
              "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
              "num_key_value_heads": key("attention.head_count_kv", heads),
              "head_dim": key("attention.key_length", hidden // heads),
              "intermediate_size": key("feed_forward_length"), "vocab_size": vocab,
              "tie_word_embeddings": not fields.get("has_output_tensor", False),
              "max_position_embeddings": fields.get(f"{arch}.context_length"),
              "dtype": "float32"}  # edgetune dequantizes GGUF models to a float32 checkpoint
    window = fields.get(f"{arch}.attention.sliding_window")
    if window:  # llama.cpp's gemma3 default: every 6th layer global
        pattern = fields.get(f"{arch}.attention.sliding_window_pattern", 6)
        layers = config["num_hidden_layers"]
        flags = pattern if isinstance(pattern, list) else [i % pattern < pattern - 1 for i in range(layers)]
        config["sliding_window"] = window
        config["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
    if vocab is None:
        raise EdgetuneError(f"GGUF {name}: header has no vocabulary size or token list")
    return shape_from_config(config, name)


def shape_from_gguf(path: str | Path) -> ModelShape:
    """The shape of a .gguf file, from its header (tensor names, not tensor data)."""
    from edgetune.models import read_gguf

    reader = read_gguf(Path(path))
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            fields["tokenizer.ggml.tokens.count"] = len(field.data)
        elif not key.startswith("tokenizer."):
            fields[key] = field.contents()
    fields["has_output_tensor"] = any(t.name == "output.weight" for t in reader.tensors)
    return shape_from_gguf_fields(fields, Path(path).stem)
