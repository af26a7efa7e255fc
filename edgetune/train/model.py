"""Loading the base model for training: device, compute dtype, optional 4/8-bit base, LoRA on top."""

import platform
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.train.memory import released_promptly


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has bf16 instructions
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    """The frozen base model, in the compute dtype or with 4/8-bit linear weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    # A quantized base is read in the file's own dtype: converting a bf16 file to fp32 first left
    # ~1.4 GB of converted copies in the heap on a Qwen2.5-0.5B shape.
    load_dtype = (getattr(config, "dtype", None) or dtype) if quant == "nf4" else dtype
    with released_promptly():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=load_dtype, attn_implementation="sdpa", device_map=device,
                quantization_config=quantization_config(quant, double_quant, dtype))
        except ValueError as exc:
            if "Unrecognized configuration" in str(exc) or "does not recognize" in str(exc):
                raise EdgetuneError(f"model {model_dir}: architecture {config.model_type!r} "
                                    "is not supported by transformers") from None
            raise
        model.config.use_cache = False
        for param in model.parameters():
            param.requires_grad_(False)
        if quant == "nf4":
            keep_4bit_layout_trainable(model)
        if quant != "none":
            detach_from_weight_file(model, dtype)
    return model


def detach_from_weight_file(model: Any, dtype: Any) -> None:
    """Copy the unquantized tensors (embeddings, norms, output layer) out of the weight file's mapping,
    in the compute dtype.

    They are views of the memory-mapped safetensors file, which keeps every page that quantization
    read resident: +0.4 GB of RSS on SmolLM2-135M until the last view is gone.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _, tensor in tensors:
            if isinstance(tensor, quantized):
                continue
            target = dtype if tensor.is_floating_point() else tensor.dtype
            tensor.data = tensor.data.to(target, copy=True)


def keep_4bit_layout_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for inference during an eval pass.

    On CPUs with AVX512-BF16, a no-grad forward in eval mode converts Linear4bit weights to an
    inference layout; later training steps still run but gradients through the base layers collapse
    (layer-0 lora_B grad norm measured 1.35e-2 before an eval pass, 4.3e-5 after).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model: Any, rank: int, alpha: float, dropout: float, modules: str | list[str],
             seed: int, grad_checkpointing: bool) -> Any:
    """Wrap the base in a PEFT LoRA model; adapter weights stay fp32 for stable updates."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                        task_type="CAUSAL_LM", bias="none")
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise EdgetuneError(f"--target-modules {modules}: {str(exc).splitlines()[0]}") from None
    if grad_checkpointing:
        peft_model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their real element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += shape.numel() if shape is not None else p.numel()
    return trainable, total
