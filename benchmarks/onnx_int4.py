"""ONNX int4 against int8: size and quality of onnxruntime-genai builds of one model.

    python benchmarks/onnx_int4.py [MODEL] [--variants default,k_quant_last,...] [--positions 1024]

MODEL is a merged HF folder, a training run (merged first) or a built-in name (default smollm2-135m).
Builds the int8 folder and the int4 folder as `edgetune export --onnx` does, plus any named variants of
the builder's options (VARIANTS), and compares each with torch on the built-in held-out texts: size,
size as a share of int8, relative KLD, perplexity ratio, top-1 and clear-margin top-1.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_BASE = ["accuracy_level=4", "block_size=32"]
VARIANTS = {  # name: the builder's --extra_options for int4
    "default": _BASE,  # the builder's own int4 (RTN, 4-bit output layer and shared embedding)
    "rtn_last": _BASE + ["algo_config=rtn", "matmul_mixed_precision=last_matmul:int8"],
    "k_quant": _BASE + ["algo_config=k_quant"],
    "k_quant_last": _BASE + ["algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8"],
    "k_quant_mixed": _BASE + ["algo_config=k_quant",
                              "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"],
    "rtn_last_fp32_act": ["accuracy_level=1", "block_size=32", "algo_config=rtn",
                          "matmul_mixed_precision=last_matmul:int8"],
}


def _model(name: str, work: Path) -> Path:
    import yaml

    from edgetune import models
    from edgetune.export.merge import merge

    path = Path(name)
    if (path / "edgetune_run.yaml").is_file():
        settings = yaml.safe_load((path / "edgetune_run.yaml").read_text())
        return merge(models.resolve(settings["model"]), path, work / "merged")
    return models.resolve(name)


def _build(model_dir: Path, out: Path, precision: str, options: list[str] | None) -> None:
    from edgetune.export import onnx_genai

    if options is None:
        onnx_genai.build(model_dir, out, precision)
        return
    chosen = onnx_genai._options
    onnx_genai._options = lambda model, precision: options
    try:
        onnx_genai.build(model_dir, out, precision)
    finally:
        onnx_genai._options = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--variants", default="", help=f"also build: {', '.join(VARIANTS)}")
    parser.add_argument("--positions", type=int, default=1024)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.export.heldout import builtin_mix
    from edgetune.export.onnx import folder_size
    from edgetune.export.onnx_runtime import onnx_logits
    from edgetune.export.verify import compare, reference
    from edgetune.hf import read_config
    from edgetune.tables import columns

    with tempfile.TemporaryDirectory(prefix="edgetune-int4-") as tmp:
        work = Path(tmp)
        model_dir = _model(args.model, work)
        ids = builtin_mix(AutoTokenizer.from_pretrained(model_dir), args.positions + 1)[0]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = reference(ids, model(torch.tensor([ids])).logits[0, :-1].numpy())
        del model
        builds = [("int8 (edgetune)", "int8", None), ("int4 (edgetune)", "int4", None)]
        builds += [(name, "int4", VARIANTS[name]) for name in args.variants.split(",") if name]
        rows = [("build", "MiB", "size / int8", "rel KLD", "ppl ratio", "top-1", "clear top-1")]
        int8_size = None
        for i, (name, precision, options) in enumerate(builds):
            out = work / f"onnx-{i}"
            _build(model_dir, out, precision, options)
            logits = onnx_logits(out / "model.onnx", ids, read_config(model_dir))[:-1]
            row = compare(name, name, precision, logits, ref, folder_size(out), None)
            int8_size = int8_size or row.size_bytes
            clear = f"{row.clear_top1:.1%}" if row.clear_top1 is not None else "-"
            rows.append((name, f"{row.size_bytes / 2**20:.1f}", f"{row.size_bytes / int8_size:.1%}",
                         f"{row.relative_kld:.2%}", f"{row.perplexity_ratio:.3f}",
                         f"{row.top1_agreement:.1%}", clear))
            print(columns(rows[-1:]), flush=True)
    print()
    print(columns(rows))


if __name__ == "__main__":
    main()
