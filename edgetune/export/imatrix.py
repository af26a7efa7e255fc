"""Importance matrix: per input channel of every linear layer, the mean of x^2 over calibration tokens.

This is llama.cpp's definition (tools/imatrix): quantizing a row, llama.cpp weighs each column's
rounding error by how large that column's input activations are, so the channels that carry the
signal keep their precision. We compute it in torch with hooks on the merged model, over the run's
training data by default, and save it as `imatrix.gguf` in llama.cpp's format so llama-quantize and
other tools can reuse it: general.type "imatrix"; per weight, `<name>.in_sum2` (the sum of x^2 per
input channel) and `<name>.counts` (tokens seen), both f32; imatrix.datasets, imatrix.chunk_count
and imatrix.chunk_size. Like llama-imatrix, only the blocks' weights are covered, not the output.
"""

from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import EdgetuneError

CHUNK_TOKENS = 512  # llama-imatrix's default context: calibration text is cut into chunks this long
MAX_TOKENS = 8192  # 16 chunks: export runs the model over them on the CPU, so keep it to a few passes


@dataclass
class Imatrix:
    """Sums of x^2 ([matrices, input channels]) and token counts per GGUF weight name, in float32 as
    the file stores them, so a matrix quantizes the same whether computed now or read back."""

    sums: dict[str, "object"]
    counts: dict[str, "object"]  # numpy [matrices]
    datasets: list[str]
    chunks: int
    chunk_size: int

    def means(self) -> dict[str, "object"]:
        """{name: mean x^2 flattened}: what llama.cpp's quantizer takes, divided in float32 with 1
        where nothing was counted, as llama-quantize does when it loads a file."""
        import numpy as np

        out = {}
        for name, sums in self.sums.items():
            counts = np.asarray(self.counts[name], dtype=np.float32)[:, None]
            sums = np.asarray(sums, dtype=np.float32)
            out[name] = np.where(counts > 0, sums / np.maximum(counts, 1), np.float32(1)).ravel()
        return out

    @property
    def tokens(self) -> int:
        return int(max((int(c.max()) for c in self.counts.values()), default=0))


def calibration_chunks(token_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The examples' ids joined and cut into CHUNK_TOKENS-long chunks, at most `max_tokens` in all."""
    flat = [t for ids in token_ids for t in ids][:max_tokens]
    return [flat[i:i + CHUNK_TOKENS] for i in range(0, len(flat), CHUNK_TOKENS)]


def compute(model_dir: Path, chunks: list[list[int]], datasets: list[str]) -> Imatrix:
    """Run the HF model in `model_dir` over `chunks` and collect x^2 at every linear layer's input."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.gguf import Namer
    from edgetune.hf import read_config

    namer = Namer(read_config(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def collect(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return collect

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name, _ = namer.name(module_name + ".weight")
            if gguf_name.startswith("blk."):
                handles.append(module.register_forward_pre_hook(hook(gguf_name)))
    body = getattr(model, "model", model)  # the decoder alone: the output layer is not covered
    with torch.no_grad():
        for ids in chunks:
            body(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return Imatrix({n: s[None, :].astype(np.float32) for n, s in sums.items()},
                   {n: np.array([c]) for n, c in counts.items()}, datasets, len(chunks), CHUNK_TOKENS)


def write(imatrix: Imatrix, path: Path) -> None:
    """Save in llama.cpp's imatrix GGUF format (what llama-imatrix writes and llama-quantize reads)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="")
    for kv in writer.kv_data:  # llama-imatrix writes no architecture; the writer always adds one
        kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, imatrix.datasets)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunks)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        sums = np.asarray(imatrix.sums[name], dtype=np.float32)
        writer.add_tensor(f"{name}.in_sum2", sums)
        writer.add_tensor(f"{name}.counts", np.asarray(imatrix.counts[name], np.float32)[:, None])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> Imatrix:
    """An imatrix GGUF file (llama-imatrix's or ours)."""
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise EdgetuneError(f"--imatrix {path}: not a GGUF imatrix file ({exc}); an old imatrix.dat "
                            "converts with llama-imatrix --in-file FILE.dat -o FILE.gguf") from None
    tensors = {t.name: t for t in reader.tensors}
    names = sorted(n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2"))
    if not names:
        raise EdgetuneError(f"--imatrix {path}: the file has no <tensor>.in_sum2 entries; "
                            "is it an importance matrix?")
    sums, counts = {}, {}
    for name in names:
        if f"{name}.counts" not in tensors:
            raise EdgetuneError(f"--imatrix {path}: {name} has sums but no counts")
        counts[name] = np.asarray(tensors[f"{name}.counts"].data, np.float32).ravel()
        sums[name] = np.asarray(tensors[f"{name}.in_sum2"].data, np.float32).reshape(len(counts[name]), -1)

    def field(key, default):
        found = reader.get_field(key)
        return found.contents() if found is not None else default

    return Imatrix(sums, counts, list(field("imatrix.datasets", [])), int(field("imatrix.chunk_count", 0)),
                   int(field("imatrix.chunk_size", 0)))


def check(imatrix: Imatrix, f16_path: Path, label: str) -> None:
    """Refuse an imatrix made for another model: every name must be one of the file's matrices, with
    as many values as the matrix's rows are long."""
    from gguf import GGUFReader

    widths = {t.name: int(t.shape[0]) for t in GGUFReader(f16_path).tensors if len(t.shape) > 1}
    for name, sums in sorted(imatrix.sums.items()):
        if name not in widths:
            raise EdgetuneError(f"--imatrix {label} was made for another model: it has {name}, "
                                "which this model does not")
        if sums.shape[-1] != widths[name]:
            raise EdgetuneError(f"--imatrix {label} was made for another model: its {name} has "
                                f"{sums.shape[-1]} values per row, this model's has {widths[name]}")
