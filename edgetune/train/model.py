"""Loading the base model for training: device, compute dtype, optional 4/8-bit base, LoRA on top."""

import contextlib
import warnings
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.hardware import cpu_has_bf16
from edgetune.train.heap import released_promptly


def pick_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise EdgetuneError("--device cuda was asked for, but torch sees no CUDA GPU")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    """The compute dtype, announcing a fallback so the user knows what runs."""
    import torch

    if requested == "fp32":
        return torch.float32
    native = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()
    if requested == "bf16" and not native:
        print(f"edgetune: warning: this {device.upper()} has no native bf16; it will be slow")
        return torch.bfloat16
    if requested == "auto" and not native:
        print(f"edgetune: no native bf16 on this {device.upper()}: training in fp32")
        return torch.float32
    return torch.bfloat16


def quantization_config(quant: str, double_quant: bool, dtype: Any) -> Any:
    """bitsandbytes settings for the frozen base; None keeps it in the compute dtype."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage="uint8",
                              llm_int8_skip_modules=["lm_head"])


def load_base(model_dir: Path, dtype: Any, device: str, quant: str = "none",
              double_quant: bool = True) -> Any:
    """The frozen base model, in the compute dtype or with 4/8-bit linear weights.

    With a quantized base, the embeddings stay in the checkpoint's dtype when it is narrower than the
    compute dtype (bf16 beside fp32 compute) and are widened where used (see `narrow_embeddings`).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    file_dtype = getattr(config, "dtype", None) or dtype
    # A quantized base is read in the file's own dtype: converting a bf16 file to fp32 first leaves the
    # converted copies in the heap (docs/qlora.md), and the embeddings stay as narrow as the file.
    load_dtype = dtype if quant == "none" else file_dtype
    with released_promptly():
        try:
            model = _from_pretrained(model_dir, config, load_dtype, device,
                                     quantization_config(quant, double_quant, dtype),
                                     in_place=quant == "none" and file_dtype == dtype)
        except ValueError as exc:
            if "Unrecognized configuration" in str(exc) or "does not recognize" in str(exc):
                raise EdgetuneError(f"model {model_dir}: architecture {config.model_type!r} "
                                    "is not supported by transformers") from None
            raise
        except (OSError, SafetensorError) as exc:  # a truncated or damaged weight file
            raise EdgetuneError(f"cannot load the weights of {model_dir}: "
                                f"{str(exc).splitlines()[0][:200]}") from None
        model.config.use_cache = False
        for param in model.parameters():
            param.requires_grad_(False)
        if quant == "nf4":
            keep_4bit_layout_trainable(model)
        if quant != "none" and device == "cpu":
            _use_workspace(model, quant)
        if quant != "none":
            narrow = file_dtype.itemsize < dtype.itemsize and device == "cpu"
            if narrow:
                narrow_embeddings(model, dtype)
            to_compute_dtype(model, dtype, keep_embeddings=narrow)
    return model


def _use_workspace(model: Any, quant: str) -> None:
    """Quantized layers on the CPU widen their weights into one shared buffer (train/fourbit.py,
    train/eightbit.py)."""
    if quant == "nf4":
        from edgetune.train.fourbit import use_workspace
    else:
        from edgetune.train.eightbit import use_workspace
    use_workspace(model)


def _from_pretrained(model_dir: Path, config: Any, dtype: Any, device: str, quantization: Any,
                     in_place: bool) -> Any:
    """transformers' loader, reading the checkpoint with pread unless its tensors are used as they are.

    transformers memory-maps safetensors files, and every mapped page it reads stays in the resident
    set until the file is closed. When the weights are converted (quantized, or widened to the compute
    dtype) those pages roughly doubled the loading peak. Read with pread, each tensor is a temporary
    freed once converted. A checkpoint already in the compute dtype and not quantized keeps the
    mapping: its pages are the weights, with no copy (docs/qlora.md has the measurements).
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa", "device_map": device,
              "quantization_config": quantization}
    files = _safetensors_files(model_dir)
    if in_place or not files:
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    from safetensors import safe_open

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"Unrecognized configuration class {type(config).__name__}") from None
    readers = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    # Slices are read only when transformers loads each weight.
    state_dict = {name: reader.get_slice(name) for reader in readers for name in reader.keys()}
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    # What from_pretrained(model_dir) records, and PEFT writes as the adapter's base.
    model.name_or_path = model.config.name_or_path = str(model_dir)
    return model


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, or [] for other formats (left to transformers)."""
    from edgetune.hf import weight_files

    try:
        return weight_files(model_dir)
    except EdgetuneError:
        return []


def to_compute_dtype(model: Any, dtype: Any, keep_embeddings: bool = False) -> None:
    """Bring the tensors left unquantized (norms, and embeddings unless kept narrow) to the compute
    dtype; tied tensors are converted once."""
    import bitsandbytes as bnb
    import torch

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    kept = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None} if keep_embeddings else set()
    done = set()
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _, tensor in tensors:
            if isinstance(tensor, quantized) or id(tensor) in kept or id(tensor) in done:
                continue
            done.add(id(tensor))
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
        if hasattr(module, "scalar_embed_scale"):  # its buffer was rounded when loaded narrow
            module.embed_scale.data = torch.tensor(module.scalar_embed_scale, dtype=dtype,
                                                   device=module.embed_scale.device)


def narrow_embeddings(model: Any, dtype: Any) -> None:
    """Keep the input and output embeddings in their stored dtype and compute with them in `dtype`.

    On a small model with a large vocabulary these are the biggest unquantized tensors, and bf16
    halves them. Widening bf16 to fp32 is exact, so results
    are those of fp32 embeddings. The input embedding's output is widened; the output layer is
    widened a block of rows at a time (`edgetune.train.loss.block_rows`), by the trainer's loss and
    here when called as a layer (generation, full logits).
    """
    import torch.nn.functional as F

    from edgetune.train.loss import block_rows

    embed = model.get_input_embeddings()
    scale = getattr(embed, "scalar_embed_scale", None)
    if scale is None:
        embed.register_forward_hook(lambda _m, _args, out: out.to(dtype))
    else:
        # Gemma scales embeddings by sqrt(hidden) in the table's dtype: in bf16 the scale itself
        # rounds (sqrt(640) = 25.298 becomes 25.25). Widened rows times the exact scale are what an
        # fp32 table gives.
        def scaled_forward(ids: Any) -> Any:
            rows = F.embedding(ids, embed.weight, embed.padding_idx).to(dtype)
            return rows * scale

        embed.forward = scaled_forward
    head = model.get_output_embeddings()
    if head is None:
        return

    def widened_forward(x: Any) -> Any:
        import torch

        weight, rows = head.weight, block_rows(head.weight, x.dtype)
        blocks = [F.linear(x, weight[start:start + rows].to(x.dtype))
                  for start in range(0, weight.shape[0], rows)]
        out = torch.cat(blocks, dim=-1)
        return out if head.bias is None else out + head.bias.to(out.dtype)

    head.forward = widened_forward


def keep_4bit_layout_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for inference during an eval pass.

    On CPUs with AVX512-BF16, a no-grad forward in eval mode converts Linear4bit weights to an
    inference layout; later training steps still run but gradients through the base layers collapse
    by orders of magnitude (tests/test_qlora.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model: Any, rank: int, alpha: float, dropout: float, modules: str | list[str],
             seed: int, grad_checkpointing: bool) -> Any:
    """Wrap the base in a PEFT LoRA model with LoRA layers computed in place (edgetune.train.lora) and
    RMSNorm layers fused (edgetune.train.norm)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                        task_type="CAUSAL_LM", bias="none")
    return add_adapter(model, config, seed, grad_checkpointing, fuse=True)


def add_adapter(model: Any, config: Any, seed: int, grad_checkpointing: bool, fuse: bool,
                method_name: str = "lora") -> Any:
    """Wrap the base in a PEFT model for the PEFT `config` (adapter weights fp32 for stable updates);
    with `fuse`, LoRA and DoRA layers are computed in place (edgetune.train.lora, .dora) and RMSNorm
    layers fused (edgetune.train.norm)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules the architecture does not have
        modules = getattr(config, "target_modules", None)
        given = f" --target-modules {_listed(modules)}" if modules else ""
        raise EdgetuneError(f"--method {method_name}{given}: {str(exc).splitlines()[0]}") from None
    if fuse:
        from edgetune.train.dora import fuse_dora
        from edgetune.train.lora import fuse_lora
        from edgetune.train.norm import fuse_norms

        fuse_lora(peft_model)
        fuse_dora(peft_model)
        fuse_norms(peft_model)
    if grad_checkpointing:
        checkpoint_layers(peft_model.get_base_model())
    return peft_model


def checkpoint_layers(model: Any) -> None:
    """Turn on activation checkpointing (non-reentrant) under the name this transformers uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_targets(model_dir: Path, modules: Any, method_name: str) -> None:
    """Name a listed target module the model lacks, before its weights load: PEFT would adapt the
    modules it finds and skip the others silently. The layout comes from config.json alone (the
    model is built on the meta device)."""
    if not modules or isinstance(modules, str):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    linear = {n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    missing = sorted(set(modules) - linear)
    if missing:
        raise EdgetuneError(f"--method {method_name} --target-modules {_listed(modules)}: the model "
                            f"has no {', '.join(missing)}; its linear layers are {', '.join(sorted(linear))}")


def _listed(modules: Any) -> str:
    return modules if isinstance(modules, str) else ",".join(sorted(modules))


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their real element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += shape.numel() if shape is not None else p.numel()
    return trainable, total


@contextlib.contextmanager
def quiet_peft():
    """PEFT reads transformers' deprecated name for checkpointing whenever it wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """A saved PEFT adapter over `model` (PeftModel.from_pretrained), for inference."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, adapter_dir)
