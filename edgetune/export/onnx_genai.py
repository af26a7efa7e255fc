"""ONNX through onnxruntime-genai's model builder: the folder ONNX Runtime's generate API loads.

The builder writes genai_config.json, model.onnx(+.data) with a KV cache and fused
GroupQueryAttention, and the tokenizer with its chat template. int8 and int4 are weight-only
MatMulNBits blocks of 32 with accuracy_level 4 (int8 activations on CPU), the builder's CPU default;
accuracy_level 1 (fp32 activations) has no fast 8-bit kernel and decodes far slower (docs/export.md).
"""

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.onnx_runtime import quiet_quantizer


def build(model_dir: Path, out_dir: Path, precision: str) -> None:
    """Write the onnxruntime-genai folder for `model_dir` at `precision` into `out_dir`."""
    try:
        from onnxruntime_genai.models import builder
    except ImportError as exc:
        raise EdgetuneError(f"ONNX export needs onnxruntime-genai and onnx-ir ({exc}); "
                            "pip install onnxruntime-genai onnx-ir") from None
    log = io.StringIO()
    # The builder prints a progress line per tensor and the quantizer logs one per MatMul; keep them
    # for the error message only.
    with tempfile.TemporaryDirectory(prefix="edgetune-onnx-") as cache, quiet_quantizer(), \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            extra = builder.parse_extra_options("", str(model_dir), str(out_dir), precision, "cpu",
                                                cache, _options(model_dir, precision))
            builder.create_model("", str(model_dir), str(out_dir), precision, "cpu", cache, **extra)
        except Exception as exc:  # the builder raises bare Exceptions; keep its output for the report
            tail = "\n".join(log.getvalue().splitlines()[-20:])
            raise RuntimeError(f"onnxruntime-genai's model builder failed: {exc}\n{tail}") from exc
    if not (Path(out_dir) / "genai_config.json").is_file():
        raise RuntimeError(f"model builder wrote no genai_config.json in {out_dir}")


def _options(model_dir: Path, precision: str) -> list[str]:
    """The builder's extra options for `precision`."""
    if precision == "fp32":
        return []
    options = ["accuracy_level=4", "block_size=32"]
    if precision == "int4":
        # k-quant's rounding search, and 8 bits for the output layer (with a tied model, the shared
        # embedding too) and for llama.cpp's most sensitive matrices (qkv, v, down of the first and
        # last eighth of the layers and every third one): the builder's plain 4-bit build cost a 135M
        # model a fifth of its perplexity (docs/export.md).
        options += ["algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"]
    tied = json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings", False)
    if precision == "int8" and tied:
        # int8 cannot share a quantized matrix with the embedding's Gather, so the builder would store
        # an fp32 embedding plus an int8 copy as the output projection. Leaving the projection in fp32
        # lets both share one matrix: a smaller file that agrees better with torch (logits come out of
        # fp32 activations), for somewhat slower decoding (docs/export.md).
        options.append("nodes_to_exclude=/lm_head/MatMul")
    return options


def decode(out_dir: Path, prompt: list[int], n_tokens: int, config: dict) -> tuple[list[int], float]:
    """Greedy-decode `n_tokens` after `prompt` with onnxruntime-genai: (tokens, decode tokens/s).

    The prompt's prefill is timed apart, so the rate is that of token-by-token decoding, the figure
    that memory bandwidth bounds on a phone or a Pi.
    """
    import onnxruntime_genai as og

    model = og.Model(str(out_dir))
    params = og.GeneratorParams(model)
    total = len(prompt) + n_tokens
    # min_length keeps EOS from ending the run early, so the count (and the comparison) is fixed.
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # first token comes from the prefill
    started = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    elapsed = time.perf_counter() - started
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    rate = (len(tokens) - 1) / elapsed if elapsed > 0 and len(tokens) > 1 else None
    return tokens, rate
