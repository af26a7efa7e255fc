"""The measurements behind verification's gates: every gated file type of a run, on six held-out texts.

    python benchmarks/verification_matrix.py RUN [RUN ...] [--work DIR] [--no-onnx] [--json OUT]

RUN is an `edgetune train` folder or a model (built-in name or HF folder). For each, the merged model
is written as GGUF f16, bf16 and q8_0, as adapter.gguf over an f16 base (runs only) and as ONNX fp32
and int8 (onnxruntime-genai), the files export writes. Each is compared with torch on the five
built-in texts (prose, narrative, dialogue, code, numbers) and on the run's own eval split, 256
positions each. Prints a row per (run, text, file), then per file type the worst relative KLD and
clear-margin top-1 over everything, against the gate (edgetune/export/gate.py).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POSITIONS = 256


def _files(run: Path, work: Path, onnx: bool) -> tuple[Path, dict, dict | None]:
    """(merged model, {label: (runtime, path, adapter)}, run settings) for one RUN, written in work."""
    import yaml

    from edgetune import models
    from edgetune.export import onnx_genai
    from edgetune.export.gguf import write_adapter_gguf, write_gguf
    from edgetune.export.merge import merge

    settings = None
    if (run / "edgetune_run.yaml").is_file():
        settings = yaml.safe_load((run / "edgetune_run.yaml").read_text())
    base = models.resolve(settings["model"] if settings else str(run))
    model_dir = merge(base, run, work / "merged") if settings else base
    files = {}
    for kind in ("f16", "bf16", "q8_0"):
        write_gguf(model_dir, work / f"model-{kind}.gguf", kind)
        files[f"gguf {kind}"] = ("gguf", work / f"model-{kind}.gguf", None)
    if settings:
        write_gguf(base, work / "base-f16.gguf", "f16")
        write_adapter_gguf(base, run, work / "adapter.gguf")
        files["gguf adapter over f16"] = ("gguf", work / "base-f16.gguf", work / "adapter.gguf")
    for precision in ("fp32", "int8") if onnx else ():
        onnx_genai.build(model_dir, work / f"onnx-{precision}", precision)
        files[f"onnx {precision}"] = ("onnx", work / f"onnx-{precision}", None)
    return model_dir, files, settings


def _logits(runtime: str, path: Path, adapter: Path | None, ids: list[int], config: dict):
    import numpy as np

    from edgetune.export.llama import load_llama
    from edgetune.export.onnx_runtime import onnx_logits

    if runtime == "onnx":
        return onnx_logits(path / "model.onnx", ids, config)[:-1]
    llm = load_llama(path, n_ctx=len(ids) + 8, lora=adapter)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids) - 1], dtype=np.float32)
    finally:
        llm.close()


def measure(run: Path, work: Path, onnx: bool) -> list[dict]:
    from transformers import AutoTokenizer

    from edgetune.export.heldout import TEXTS, run_examples, text_ids
    from edgetune.export.verify import compare, torch_reference
    from edgetune.hf import read_config

    model_dir, files, settings = _files(run, work, onnx)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = {kind: text_ids(tokenizer, kind)[:POSITIONS + 1] for kind in TEXTS}
    if settings:
        held = run_examples(settings, tokenizer)[1]
        texts["eval split"] = [t for example in held for t in example][:POSITIONS + 1]
    rows = []
    for text, ids in texts.items():
        if len(ids) < 2:
            continue
        ref = torch_reference(model_dir, ids)
        for label, (runtime, path, adapter) in files.items():
            kind = label.split()[-1]
            logits = _logits(runtime, path, adapter, ids, read_config(model_dir))
            row = compare(label, label, kind, logits, ref, 0, None)
            rows.append({"run": run.name, "text": text, "file": label, "positions": row.positions,
                         "kld": row.kld_mean, "kld_p99": row.kld_p99, "relative_kld": row.relative_kld,
                         "top1": row.top1_agreement, "clear_top1": row.clear_top1,
                         "clear_positions": row.clear_positions, "ppl_ratio": row.perplexity_ratio,
                         "passed": row.passed})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Per file type: the worst relative KLD and clear top-1 over all runs and texts, and the gate."""
    from edgetune.export.gate import GATES
    from edgetune.tables import columns

    table = [("file", "cases", "worst rel KLD", "gate", "margin", "worst clear top-1", "worst KLD p99",
              "failed")]
    for label in dict.fromkeys(r["file"] for r in rows):
        mine = [r for r in rows if r["file"] == label]
        gate = GATES[label.split()[-1]]
        worst = max(r["relative_kld"] for r in mine)
        clear = min((r["clear_top1"] for r in mine if r["clear_top1"] is not None), default=None)
        table.append((label, str(len(mine)), f"{worst:.2e}", f"{gate.max_relative_kld:.0e}",
                      f"{gate.max_relative_kld / worst:.0f}x", f"{clear:.1%}" if clear is not None else "-",
                      f"{max(r['kld_p99'] for r in mine):.4f}", str(sum(not r["passed"] for r in mine))))
    return columns(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--work", type=Path, help="keep the written files here (default: a temp dir)")
    parser.add_argument("--no-onnx", action="store_true", help="GGUF files only (faster)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for i, run in enumerate(args.runs):
        with tempfile.TemporaryDirectory(prefix="edgetune-matrix-") as tmp:
            work = (args.work / f"{i}-{Path(run).name}") if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            rows += measure(Path(run), work, not args.no_onnx)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
