"""GGUF files from an HF folder: a full model in f16/bf16/q8_0, or a LoRA adapter for llama.cpp.

One path for every architecture, driven by the ARCHITECTURES table: the llama.cpp architecture,
whether q/k rows are permuted, what is added to norm weights, and the hyper-parameters beyond the
common ones. Tensor names come from the gguf package's per-architecture tables.

- Rotary layout: llama.cpp's `llama` architecture rotates interleaved pairs (x0, x1), (x2, x3)...
  while HF Llama rotates the two halves of each head, so q_proj and k_proj rows (and an adapter's
  lora_b for them) are permuted for llama and mistral. qwen2, qwen3 and gemma3 use NEOX rotary in
  llama.cpp, which matches HF: no permutation.
- Norms: Gemma's RMSNorm scales by (1 + w) and stores w; llama.cpp's scales by its weight, so its
  converter writes w + 1, and so does this one.
- Gemma 3: local (sliding-window) and global layers, each with its own rope base; the window, the
  per-layer pattern and the local base are written where llama.cpp reads them. The embedding scale
  sqrt(hidden) is applied by llama.cpp's gemma3 graph itself (nothing to write).
"""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.hf import open_weights, read_config, weight_files
from edgetune.shape import head_dim

# Types written directly by this module; lower-bit types go through quantize.py from the f16 file.
DIRECT_TYPES = ("f16", "bf16", "q8_0")
SPOOL_BYTES = 256 * 2**20  # what GGUFWriter keeps in memory before its spool goes to disk
_Q8_BLOCK = 32
# llama.cpp's gemma3 graph: every 6th layer global unless the file says otherwise.
LLAMA_CPP_SWA_PATTERN = 6


def _gemma3_hparams(writer, config: dict) -> None:
    """Sliding window, its layer pattern and rope base, and the final soft-cap, as llama.cpp reads them."""
    if config.get("attn_logit_softcapping") is not None:
        raise EdgetuneError("attention logit soft-capping is not supported by llama.cpp's gemma3")
    if config.get("use_bidirectional_attention"):
        raise EdgetuneError("bidirectional Gemma 3 (an embedding model) is not a causal LM to export")
    if config.get("query_pre_attn_scalar", head_dim(config)) != head_dim(config):
        raise EdgetuneError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from "
                            f"head_dim {head_dim(config)}; llama.cpp scales queries by head_dim")
    types = config.get("layer_types") or []
    if config.get("sliding_window") and "sliding_attention" in types:
        writer.add_sliding_window(config["sliding_window"])
        pattern = swa_pattern(types)
        if pattern != LLAMA_CPP_SWA_PATTERN:
            writer.add_sliding_window_pattern(pattern)
        writer.add_rope_freq_base_swa(_rope(config, "sliding_attention")[0])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])


def swa_pattern(layer_types: list[str]) -> int | list[bool]:
    """llama.cpp's sliding-window pattern: n when every n-th layer is global (n - 1 local ones,
    then one global), else one flag per layer (True: sliding)."""
    flags = [t == "sliding_attention" for t in layer_types]
    for n in range(1, len(flags) + 1):
        if flags == [i % n < n - 1 for i in range(len(flags))]:
            return n
    return flags


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool = False  # interleaved ("normal") rotary in llama.cpp: permute q/k rows
    norm_shift: float = 0.0  # added to every norm weight (Gemma applies 1 + w)
    hparams: tuple[Callable, ...] = field(default=())  # writers of architecture-specific keys


ARCHITECTURES = {  # HF config.json model_type -> llama.cpp architecture
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "gemma3_text": Arch("GEMMA3", norm_shift=1.0, hparams=(_gemma3_hparams,)),
}
ROPE_TYPES = ("default", "linear", "llama3")


def architecture(config: dict) -> Arch:
    """The table entry for a config.json, refusing anything not in ARCHITECTURES."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise EdgetuneError(f"cannot export architecture {model_type!r} to GGUF; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def _rope_params(config: dict, layer_type: str = "full_attention") -> dict:
    """Rope settings, of one layer type where they differ by type (Gemma 3: full / sliding)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params


def _rope(config: dict, layer_type: str = "full_attention") -> tuple[float, str, float]:
    """(theta, type, factor) from either the transformers 4 or 5 spelling of the rope settings."""
    params = _rope_params(config, layer_type)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise EdgetuneError(f"rope type {kind!r} is not supported for GGUF export; "
                            f"supported: {', '.join(ROPE_TYPES)}")
    return float(theta), kind, float(params.get("factor", 1.0))


def add_hparams(writer, config: dict) -> None:
    """Write the architecture's hyper-parameters (the keys llama.cpp reads for llama/qwen)."""
    from gguf import RopeScalingType

    if config.get("use_sliding_window"):
        raise EdgetuneError("sliding-window attention (use_sliding_window) is not supported "
                            "for GGUF export")
    dim = head_dim(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(dim)
    if dim * config["num_attention_heads"] != config["hidden_size"]:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    theta, kind, factor = _rope(config)
    writer.add_rope_freq_base(theta)
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    for extra in architecture(config).hparams:
        extra(writer, config)


def llama3_rope_factors(config: dict):
    """Llama 3.1+ frequency scaling as llama.cpp's rope_freqs tensor (one divisor per frequency).

    High frequencies (wavelength under original_ctx / high_freq_factor) keep their value, low ones
    (over original_ctx / low_freq_factor) are divided by `factor`, and the band between is blended.
    """
    import numpy as np

    params, dim = _rope_params(config), head_dim(config)
    theta, _, factor = _rope(config)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params["original_max_position_embeddings"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def rope_permute(rows, n_head: int):
    """HF's half-split rotary layout of q/k rows -> llama.cpp's interleaved pairs, per head."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class Namer:
    """HF tensor names -> GGUF names via gguf's TensorNameMap, plus which rotary permutation applies."""

    def __init__(self, config: dict):
        import gguf

        self.arch = architecture(config)
        self.model_arch = gguf.MODEL_ARCH[self.arch.gguf_arch]
        self.table = gguf.get_tensor_name_map(self.model_arch, config["num_hidden_layers"])
        heads = config["num_attention_heads"]
        self.heads = {gguf.MODEL_TENSOR.ATTN_Q: heads,
                      gguf.MODEL_TENSOR.ATTN_K: config.get("num_key_value_heads") or heads}
        self.norms = {k for k in gguf.MODEL_TENSOR if k.name.endswith("_NORM")}

    @property
    def arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def name(self, hf_name: str) -> tuple[str, int | None]:
        """(GGUF name, heads to permute over or None)."""
        kind, gguf_name = self._find(hf_name)
        return gguf_name, (self.heads.get(kind) if self.arch.permute_qk else None)

    def _find(self, hf_name: str) -> tuple:
        found = self.table.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise EdgetuneError(f"tensor {hf_name} has no GGUF name for {self.arch_name}; "
                                "the model has layers this exporter does not know")
        return found

    def convert(self, hf_name: str, array) -> tuple[str, object]:
        """(GGUF name, array as llama.cpp wants it): q/k rows permuted, norm weights shifted."""
        kind, gguf_name = self._find(hf_name)
        heads = self.heads.get(kind) if self.arch.permute_qk else None
        if heads:
            array = rope_permute(array, heads)
        if self.arch.norm_shift and kind in self.norms:
            array = array + self.arch.norm_shift
        return gguf_name, array


def encode(array, out_type: str):
    """(data, GGML type, note) for one tensor: 1-D tensors stay f32, matrices take `out_type`."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if array.ndim == 1:
        return array.astype(np.float32), T.F32, ""
    if out_type == "f16":
        return array.astype(np.float16), T.F16, ""
    if out_type == "bf16":
        return quants.quantize(array.astype(np.float32), T.BF16), T.BF16, ""
    if out_type == "q8_0":
        if array.shape[-1] % _Q8_BLOCK:
            note = f"row length {array.shape[-1]} is not a multiple of 32: those matrices stay f16"
            return array.astype(np.float16), T.F16, note
        return quants.quantize(array.astype(np.float32), T.Q8_0), T.Q8_0, ""
    raise ValueError(f"not a direct GGUF type: {out_type}")


def _hf_tensors(model_dir: Path):
    """(name, fp32 numpy array) of every weight, one at a time."""
    import torch

    for file in weight_files(Path(model_dir)):
        with open_weights(file) as f:
            for key in f.keys():
                yield key, f.get_tensor(key).to(torch.float32).numpy()


def _file_type(out_type: str) -> int:
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "f32": LlamaFileType.ALL_F32}[out_type]


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(model_dir: Path, out_path: Path, out_type: str = "f16",
               chat_template: str | None = None) -> list[str]:
    """Write the HF model in `model_dir` as a GGUF file; returns notes worth reporting.

    `chat_template` replaces the folder's own (a run's template: see edgetune.templates)."""
    import gguf

    from edgetune.export.gguf_vocab import add_vocab

    if out_type not in DIRECT_TYPES:
        raise EdgetuneError(f"GGUF type {out_type} cannot be written directly; "
                            f"use {', '.join(DIRECT_TYPES)}")
    config = read_config(model_dir)
    namer = Namer(config)
    writer = gguf.GGUFWriter(str(out_path), namer.arch_name, use_temp_file=True)
    # Tensors wait in a spool until the header is written; past 256 MiB it spills to a file. Keep that
    # file beside the output (whose disk was checked for room), not in /tmp, a RAM tmpfs on many systems.
    writer.temp_file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=Path(out_path).parent)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(config.get("_name_or_path") or config.get("_model_name_or_path")
                        or Path(model_dir).resolve().name))
    add_hparams(writer, config)
    writer.add_file_type(_file_type(out_type))
    if out_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, model_dir, config["vocab_size"], chat_template)
    if _rope(config)[1] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          llama3_rope_factors(config))
    notes = set()
    tied = config.get("tie_word_embeddings", False)
    for hf_name, array in _hf_tensors(model_dir):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name, array = namer.convert(hf_name, array)
        data, kind, note = encode(array, out_type)
        notes.add(note)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    _finish(writer)
    return sorted(n for n in notes if n)


def adapter_alpha(pairs) -> float:
    """The one `adapter.lora.alpha` that makes llama.cpp's alpha / rank equal every pair's scale.

    llama.cpp divides by each tensor's own rank, so a per-module rank is fine, but rsLoRA (alpha /
    sqrt(r)) and per-module alphas must fold into a single alpha: this is the only place they convert.
    AdaLoRA divides by its initial rank whatever rank pruning left, so its alpha is written as given
    and each module's lora_b carries its own rank / initial rank (see `write_adapter_gguf`).
    """
    pairs = list(pairs)
    if all(p.initial_rank is not None for p in pairs):
        return pairs[0].alpha
    alphas = {round(p.scale * p.rank, 6) for p in pairs}
    if len(alphas) != 1:
        raise EdgetuneError(f"adapter modules use different LoRA scales ({sorted(alphas)}); a GGUF "
                            "adapter holds one alpha: export the merged model instead")
    return alphas.pop()


def write_adapter_gguf(base_dir: Path, adapter_dir: Path, out_path: Path) -> float:
    """Write a PEFT LoRA adapter as a llama.cpp GGUF adapter for the base in `base_dir`.

    Returns the alpha written. lora_a is [r, in] and lora_b [out, r], stored in f32 since they are small.
    """
    import gguf
    import numpy as np

    from edgetune.export.merge import load_adapter

    config = read_config(base_dir)
    namer = Namer(config)
    pairs = {k: p for k, p in load_adapter(adapter_dir).items() if p.rank > 0}  # AdaLoRA prunes to 0
    if not pairs:
        raise EdgetuneError(f"{adapter_dir}: the adapter has no LoRA tensors")
    alpha = adapter_alpha(pairs.values())
    writer = gguf.GGUFWriter(str(out_path), namer.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for hf_name, pair in sorted(pairs.items()):
        gguf_name, heads = namer.name(hf_name)
        a = pair.a.float().numpy().astype(np.float32)
        b = pair.b.float().numpy().astype(np.float32)
        if pair.initial_rank is not None:  # llama.cpp scales by alpha / rank: make it alpha / r0
            b = b * np.float32(pair.scale * pair.rank / alpha)
        if heads:
            b = rope_permute(b, heads)  # B's rows are the q/k output rows: same layout as the weight
        for suffix, data in (("lora_a", a), ("lora_b", b)):
            if not np.isfinite(data).all():
                raise EdgetuneError(f"adapter tensor {pair.module}.{suffix} has NaN or infinite values")
            writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))
    _finish(writer)
    return alpha

