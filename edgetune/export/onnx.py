"""ONNX export: a merged HF folder -> a verified ONNX folder.

Two builders. The default goes through onnxruntime-genai's model builder (`onnx_genai.py`): its folder
(genai_config.json, model.onnx with KV cache and fused attention, tokenizer) is what ONNX Runtime's
generate API loads on Android and iOS. `generic=True` goes through `torch.onnx.export(dynamo=True)`
(`onnx_generic.py`): plain ONNX ops with flat past key/values, for runtimes other than
onnxruntime-genai. Both folders use the same input and output names (input_ids, attention_mask,
past_key_values.N.key/value -> logits, present.N.key/value), so one verifier reads both.

Verification runs the exported model in onnxruntime over held-out text and compares it with the torch
fp32 model the way GGUF files are compared (verify.compare): KL divergence, clear-margin top-1
agreement and the perplexity ratio.
"""

import json
import math
import time
from pathlib import Path

from edgetune import hf
from edgetune.errors import EdgetuneError
from edgetune.export.onnx_runtime import onnx_logits
from edgetune.export.report import Verification

# model_type -> HF class: the architectures both builders handle that we test (tests/test_onnx.py).
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# Architectures the genai builder cannot build here, with the reason; --onnx-generic still can.
GENAI_REFUSED = {
    "gemma3_text": "onnxruntime-genai's model builder reads Gemma 3's rope settings in the "
                   "transformers 4 spelling (rope_theta, rope_local_base_freq) and fails on "
                   "transformers 5's per-layer-type rope_parameters",
}
PRECISIONS = ("fp32", "int8", "int4")
# fp32 and int8 folders are gated like GGUF files (gate.py); int4 is reported, not failed.
# Positions compared at most: more make the figures steadier; past 1024 verifying only gets slower.
MAX_POSITIONS = 1024
DECODE_TOKENS = 32


def read_config(model_dir: Path) -> dict:
    """config.json of a merged folder, checked against the supported architectures."""
    return hf.read_supported_config(model_dir, SUPPORTED, "ONNX export")


def export_onnx(model_dir: Path, out_dir: Path, precision: str, generic: bool,
                held_out_ids: list[int], max_length: int | None = None) -> Verification:
    """Build `out_dir` from the merged folder `model_dir`, verify it in onnxruntime, return the row.

    `max_length` (genai folders only) caps prompt plus reply in genai_config.json; onnxruntime-genai
    allocates the KV cache for all of it up front, so a device's context length belongs there.
    """
    if precision not in PRECISIONS:
        raise EdgetuneError(f"ONNX precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if len(held_out_ids) < 2:
        raise ValueError("held_out_ids needs at least 2 tokens to compare next-token predictions")
    config = read_config(model_dir)
    if not generic and config["model_type"] in GENAI_REFUSED:
        raise EdgetuneError(f"ONNX for onnxruntime-genai cannot be built for {config['model_type']}: "
                            f"{GENAI_REFUSED[config['model_type']]}; use --onnx-generic")
    limit = config.get("max_position_embeddings") or math.inf
    if max_length is not None and not 1 <= max_length <= limit:
        raise EdgetuneError(f"context length {max_length} is outside 1..{limit}, the model's limit")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if generic:
        from edgetune.export import onnx_generic as backend
    else:
        from edgetune.export import onnx_genai as backend
    kind = "generic ONNX" if generic else "ONNX (onnxruntime-genai)"
    print(f"edgetune: building {kind} {precision} in {out_dir}", flush=True)
    started = time.perf_counter()
    backend.build(model_dir, out_dir, precision)
    if max_length is not None and not generic:
        set_max_length(out_dir, max_length)
    print(f"edgetune: built in {time.perf_counter() - started:.1f} s; verifying against torch", flush=True)
    return verify(model_dir, out_dir, precision, generic, held_out_ids, config)


def set_max_length(out_dir: Path, max_length: int) -> None:
    """Cap generation (and the KV cache onnxruntime-genai allocates) at `max_length` tokens."""
    file = Path(out_dir) / "genai_config.json"
    config = json.loads(file.read_text())
    config["search"]["max_length"] = max_length
    file.write_text(json.dumps(config, indent=4) + "\n")


def verify(model_dir: Path, out_dir: Path, precision: str, generic: bool, held_out_ids: list[int],
           config: dict) -> Verification:
    """Compare the ONNX model in `out_dir` with the torch fp32 model on held-out text."""
    from edgetune.export.verify import compare, reference

    ids = held_out_ids[:min(MAX_POSITIONS + 1, config.get("max_position_embeddings") or MAX_POSITIONS)]
    torch_model = _torch_model(model_dir)
    # Logits at i predict ids[i + 1]: the last position has nothing to predict, as in the GGUF check.
    ref = reference(ids, _torch_logits(torch_model, ids)[:-1])
    exported = onnx_logits(out_dir / "model.onnx", ids, config)[:-1]
    prompt = held_out_ids[:32]
    if generic:
        from edgetune.export.onnx_generic import decode
    else:
        from edgetune.export.onnx_genai import decode
    tokens, tokens_per_s = decode(out_dir, prompt, DECODE_TOKENS, config)
    same = _greedy_prefix(torch_model, prompt, tokens)
    runtime = "onnxruntime" if generic else "onnxruntime-genai"
    note = f"greedy decode in {runtime} matches torch for {same}/{len(tokens)} tokens"
    label = f"onnx{' generic' if generic else ''} {precision}"
    return compare(f"{out_dir.name}/model.onnx", label, precision, exported, ref, folder_size(out_dir),
                   tokens_per_s, note)


def folder_size(out_dir: Path) -> int:
    """Bytes of the model files (graph and external weights), not the tokenizer and configs."""
    return sum(f.stat().st_size for f in Path(out_dir).glob("model.onnx*") if f.is_file())


def _torch_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _torch_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _greedy_prefix(model, prompt: list[int], tokens: list[int]) -> int:
    """How many of the exported model's greedy tokens torch's greedy decoding reproduces."""
    import torch

    if not tokens:
        return 0
    with torch.no_grad():
        # min_new_tokens masks EOS, as the exported side's decoding does (see decode() there).
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        n = len(tokens)
        out = model.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    expected = out[0, len(prompt):].tolist()
    mismatch = (i for i, (a, b) in enumerate(zip(expected, tokens)) if a != b)
    return next(mismatch, min(len(expected), len(tokens)))
