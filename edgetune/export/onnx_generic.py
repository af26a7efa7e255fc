"""Generic ONNX: `torch.onnx.export(dynamo=True)` over a wrapper with flat past key/values.

For runtimes other than onnxruntime-genai (onnxruntime alone, transformers.js-style loops, other
engines): plain ONNX ops, inputs input_ids, attention_mask, position_ids and
past_key_values.N.key/value, outputs logits and present.N.key/value, the names the genai folder uses.
int8 and int4 are weight-only MatMulNBits blocks of 32 with accuracy_level 4; onnxruntime's
`quantize_dynamic` also quantizes activations per tensor and lost most next-token agreement with
torch on SmolLM2-135M (docs/export.md), so it is not used.
"""

import contextlib
import io
import time
from pathlib import Path

from edgetune.errors import EdgetuneError

OPSET = 18
BITS = {"int8": 8, "int4": 4}


def _wrapper(model):
    """The model as a module taking and returning flat tensors, which ONNX export needs."""
    import torch
    from transformers import DynamicCache

    class FlatCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            cache = DynamicCache(pairs, config=self.inner.config)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return FlatCache(model).eval()


def _names(layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv]
    return inputs, ["logits"] + [f"present.{n}" for n in kv]


def _example(config) -> tuple[tuple, tuple]:
    """Example inputs and their dynamic dimensions (batch, sequence, past length)."""
    import torch

    layers = config.num_hidden_layers
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Sizes above 1 everywhere: torch.export specializes dimensions traced at 0 or 1.
    batch, seq, past = 2, 3, 4
    example = (torch.zeros(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
               torch.arange(past, past + seq).expand(batch, seq),
               *[torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * layers)])
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn},
              tuple({0: dyn, 2: dyn} for _ in range(2 * layers)))
    return example, shapes


def _fold(model) -> None:
    """Fold constants, above all the transposes of nn.Linear weights, so every projection is a MatMul
    with a constant weight that MatMulNBits can quantize.

    torch's `optimize=True` also runs onnxscript's pattern rewriter, which took 8 of the 9 minutes of a
    SmolLM2-135M export; onnxruntime fuses the same patterns itself when it loads the model.
    A weight used twice (a tied embedding: Gather and output projection) is left unfolded, so it is
    stored once.
    """
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import _constant_folding

    def shared_weight(node) -> bool | None:
        source = node.inputs[0] if node.inputs else None
        if node.op_type == "Transpose" and source is not None and source.is_initializer():
            return False if len(source.uses()) > 1 else True
        return None

    ir.passes.Sequential(
        _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=2**40,
                                            output_size_limit=2**40, should_fold=shared_weight),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
    )(model)


def build(model_dir: Path, out_dir: Path, precision: str) -> None:
    """Export `model_dir` to `out_dir`/model.onnx(+.data), quantized to `precision`, plus tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError:
        raise EdgetuneError("--onnx-generic needs onnxscript: pip install onnxscript") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.config
    example, shapes = _example(config)
    inputs, outputs = _names(config.num_hidden_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / ("model.onnx" if precision == "fp32" else "model.fp32.onnx")
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter prints its steps
        program = torch.onnx.export(_wrapper(model), example, None, dynamo=True, opset_version=OPSET,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                                    optimize=False)
        _fold(program.model)
        program.save(str(fp32_path), external_data=True)
    del model, program
    if precision != "fp32":
        _quantize(fp32_path, out_dir / "model.onnx", BITS[precision])
        for leftover in (fp32_path, fp32_path.with_name(fp32_path.name + ".data")):
            leftover.unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    config.save_pretrained(out_dir)  # head counts and sizes, which a runtime needs to shape the cache


def _quantize(src: Path, dst: Path, bits: int) -> None:
    """Weight-only MatMulNBits quantization of every MatMul with a constant weight."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgetune.export.onnx_runtime import quiet_quantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True,
                                     accuracy_level=4)
    with quiet_quantizer():
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    # onnxruntime writes the weights file owner-only (0600); give it the graph's permissions.
    data = dst.with_name(dst.name + ".data")
    if data.is_file():
        data.chmod(dst.stat().st_mode & 0o777)


def decode(out_dir: Path, prompt: list[int], n_tokens: int, config: dict) -> tuple[list[int], float]:
    """Greedy-decode `n_tokens` after `prompt` with onnxruntime and the KV cache: (tokens, tokens/s)."""
    from edgetune.export.onnx_runtime import session, step_feed

    sess = session(out_dir / "model.onnx")
    names = [o.name for o in sess.get_outputs()]
    eos = config.get("eos_token_id")
    # EOS is masked, as onnxruntime-genai's min_length does, so the count and the comparison are fixed.
    eos = [eos] if isinstance(eos, int) else list(eos or [])

    def pick(logits) -> int:
        logits = logits[0, -1].copy()
        logits[eos] = -float("inf")
        return int(logits.argmax())

    outputs = sess.run(None, step_feed(sess, config, prompt, 0, None))
    tokens = [pick(outputs[0])]
    position = len(prompt)
    started = time.perf_counter()
    for _ in range(n_tokens - 1):
        past = dict(zip(names, outputs))
        outputs = sess.run(None, step_feed(sess, config, tokens[-1:], position, past))
        position += 1
        tokens.append(pick(outputs[0]))
    elapsed = time.perf_counter() - started
    return tokens, (n_tokens - 1) / elapsed if elapsed > 0 and n_tokens > 1 else None
