"""Popular small models with their exact shapes, copied from each model's config.json on the hub.

These are data: a wrong number here is a wrong plan, so tests check the parameter counts they imply
against the counts the model cards state.
"""

from edgetune.errors import EdgetuneError
from edgetune.shape import ModelShape, shape_from_config


def _cfg(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
         vocab: int, tied: bool, head_dim: int | None = None, window: int | None = None) -> dict:
    config = {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "intermediate_size": intermediate, "vocab_size": vocab, "tie_word_embeddings": tied,
              "dtype": "bfloat16"}
    if head_dim is not None:
        config["head_dim"] = head_dim
    if window is not None:  # Gemma 3: five local (sliding-window) layers, then a global one
        config["sliding_window"] = window
        config["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                 for i in range(layers)]
    return config


# name: (hub id, config.json fields)
CATALOGUE: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", _cfg("llama", 576, 30, 9, 3, 1536, 49152, True)),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M", _cfg("llama", 960, 32, 15, 5, 2560, 49152, True)),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B", _cfg("llama", 2048, 24, 32, 32, 8192, 49152, True)),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", _cfg("qwen2", 896, 24, 14, 2, 4864, 151936, True)),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", _cfg("qwen2", 1536, 28, 12, 2, 8960, 151936, True)),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B", _cfg("qwen2", 2048, 36, 16, 2, 11008, 151936, True)),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", _cfg("qwen2", 3584, 28, 28, 4, 18944, 152064, False)),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", _cfg("qwen3", 1024, 28, 16, 8, 3072, 151936, True, 128)),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B", _cfg("qwen3", 2048, 28, 16, 8, 6144, 151936, True, 128)),
    "qwen3-4b": ("Qwen/Qwen3-4B", _cfg("qwen3", 2560, 36, 32, 8, 9728, 151936, True, 128)),
    "qwen3-8b": ("Qwen/Qwen3-8B", _cfg("qwen3", 4096, 36, 32, 8, 12288, 151936, False, 128)),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", _cfg("llama", 2048, 16, 32, 8, 8192, 128256, True, 64)),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", _cfg("llama", 3072, 28, 24, 8, 8192, 128256, True, 128)),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", _cfg("llama", 4096, 32, 32, 8, 14336, 128256, False)),
    "gemma-2-2b": ("google/gemma-2-2b", _cfg("gemma2", 2304, 26, 8, 4, 9216, 256000, True, 256)),
    "gemma3-270m": ("google/gemma-3-270m",
                    _cfg("gemma3_text", 640, 18, 4, 1, 2048, 262144, True, 256, window=512)),
    "gemma3-1b": ("google/gemma-3-1b-pt",
                  _cfg("gemma3_text", 1152, 26, 4, 1, 6912, 262144, True, 256, window=512)),
    # The 4B checkpoint is multimodal; these are its text model's numbers (text_config).
    "gemma3-4b": ("google/gemma-3-4b-pt",
                  _cfg("gemma3_text", 2560, 34, 8, 4, 10240, 262208, True, 256, window=1024)),
    "phi-3.5-mini": ("microsoft/Phi-3.5-mini-instruct",
                     _cfg("phi3", 3072, 32, 32, 32, 8192, 32064, False)),
    "mistral-7b": ("mistralai/Mistral-7B-v0.3", _cfg("mistral", 4096, 32, 32, 8, 14336, 32768, False)),
}


def catalogue_shape(name: str) -> ModelShape:
    """The shape of a catalogue model by name (case-insensitive)."""
    key = name.lower()
    if key not in CATALOGUE:
        raise EdgetuneError(f"model {name} is not in the catalogue; known: {', '.join(CATALOGUE)}")
    return shape_from_config(CATALOGUE[key][1], key)


def all_shapes() -> list[ModelShape]:
    """Every catalogue model's shape, smallest first."""
    return [catalogue_shape(name) for name in CATALOGUE]
