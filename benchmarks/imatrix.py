"""Importance-weighted quantization: mean KLD of llama.cpp's types with and without an imatrix.

    python benchmarks/imatrix.py RUN [--types q4_k_m,q3_k_m,q2_k,iq4_xs,iq3_xxs] [--positions 256]

RUN is an `edgetune train` folder (the quick-start's is edgetune-quickstart/run). The importance
matrix is computed as `edgetune export` computes it, from the run's training data; every file is then
scored in llama.cpp against the torch merged model on held-out text that is not calibration text: the
five built-in texts (prose, narrative, dialogue, code, numbers) and the run's eval split, each
`--positions` long. Prints one row per type: size, the tensor types llama.cpp wrote, mean KLD without
and with the imatrix (over all six texts, and on the eval split alone) and their ratio.
"""

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

TYPES = "q6_k,q5_k_m,q4_k_m,q4_0,iq4_xs,q3_k_m,iq3_xxs,q2_k"


def texts(tokenizer, held: list[list[int]], positions: int) -> dict[str, list[int]]:
    """Held-out ids per text: each built-in text and the run's eval split, positions + 1 long."""
    from edgetune.export.heldout import TEXTS, text_ids

    out = {kind: text_ids(tokenizer, kind)[:positions + 1] for kind in TEXTS}
    out["eval split"] = [t for example in held for t in example][:positions + 1]
    return {name: ids for name, ids in out.items() if len(ids) > 1}


def mean_kld(path: Path, references: dict) -> dict[str, float]:
    """{text: mean KL(torch || file)} of the GGUF at `path` in llama.cpp."""
    import numpy as np

    from edgetune.export.gate import distance
    from edgetune.export.llama import load_llama

    out = {}
    for name, (ids, logits) in references.items():
        llm = load_llama(path, n_ctx=len(ids) + 8)
        try:
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids) - 1], dtype=np.float32)
        finally:
            llm.close()
        out[name] = float(distance(got, logits).kld.mean())
    return out


def written(path: Path) -> str:
    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name.lower() for t in GGUFReader(path).tensors if len(t.shape) > 1)
    return " ".join(f"{n}x{kind}" for kind, n in counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", default=TYPES)
    parser.add_argument("--positions", type=int, default=256)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from edgetune import models
    from edgetune.export import imatrix
    from edgetune.export.gguf import write_gguf
    from edgetune.export.heldout import run_examples
    from edgetune.export.merge import merge
    from edgetune.export.quantize import NEEDS_IMATRIX, quantize
    from edgetune.export.verify import torch_reference
    from edgetune.tables import columns

    settings = yaml.safe_load((args.run / "edgetune_run.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="edgetune-imatrix-") as tmp:
        work = Path(tmp)
        merged = merge(models.resolve(settings["model"]), args.run, work / "merged")
        tokenizer = AutoTokenizer.from_pretrained(merged)
        train, held = run_examples(settings, tokenizer)
        chunks = imatrix.calibration_chunks(train)
        print(f"calibration: {sum(map(len, chunks))} tokens of {settings['data']} "
              f"({len(train)} training examples); held out: {len(held)} eval examples", flush=True)
        matrix = imatrix.compute(merged, chunks, [settings["data"]]).means()
        references = {name: (ids, torch_reference(merged, ids).logits)
                      for name, ids in texts(tokenizer, held, args.positions).items()}
        write_gguf(merged, work / "f16.gguf", "f16")
        write_gguf(merged, work / "q8_0.gguf", "q8_0")
        rows = [("type", "MiB", "matrices written as", "KLD plain", "KLD imatrix", "ratio",
                 "eval plain", "eval imatrix")]

        def score(name: str, path: Path) -> dict:
            kld = mean_kld(path, references)
            return {"all": sum(kld.values()) / len(kld), "eval": kld.get("eval split", float("nan")),
                    "MiB": path.stat().st_size / 2**20, "types": written(path)}

        for name in ("f16", "q8_0"):
            s = score(name, work / f"{name}.gguf")
            rows.append((name, f"{s['MiB']:.1f}", s["types"], f"{s['all']:.4f}", "-", "-",
                         f"{s['eval']:.4f}", "-"))
            print(columns(rows[-1:]), flush=True)
        for kind in args.types.split(","):
            plain = None
            if kind not in NEEDS_IMATRIX:
                quantize(work / "f16.gguf", work / f"{kind}.gguf", kind)
                plain = score(kind, work / f"{kind}.gguf")
            quantize(work / "f16.gguf", work / f"{kind}-imatrix.gguf", kind, imatrix=matrix)
            weighted = score(kind, work / f"{kind}-imatrix.gguf")
            ratio = f"{weighted['all'] / plain['all']:.2f}" if plain else "-"
            rows.append((kind, f"{weighted['MiB']:.1f}", weighted["types"],
                         f"{plain['all']:.4f}" if plain else "needs imatrix", f"{weighted['all']:.4f}",
                         ratio, f"{plain['eval']:.4f}" if plain else "-", f"{weighted['eval']:.4f}"))
            print(columns(rows[-1:]), flush=True)
    print()
    print(columns(rows))


if __name__ == "__main__":
    main()
