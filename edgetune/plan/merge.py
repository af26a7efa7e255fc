"""Peak memory of `edgetune merge`: pure arithmetic over the base's shape and the adapters' ranks.

The merge holds one layer at a time: each input's dense update of that layer (fp32), the copies the
combination makes of them, and the SVD's float64 work on the result. The input adapters are
memory-mapped and read a layer at a time (their touched pages count as resident); the output adapter
is streamed to disk. `--full` streams the base checkpoint through as well: its mapped pages stay
resident until the end (clean file pages, which the kernel drops under memory pressure).
"""

from edgetune.shape import DTYPE_BYTES, ModelShape

MiB = 2**20
# Resident memory once torch and safetensors are imported and torch's linear-algebra kernels are
# loaded (PEFT's merge functions come without the rest of peft and transformers; see
# edgetune.export.algebra): measured 233 MiB, torch 2.13 CPU.
MERGE_RUNTIME_BYTES = 233 * MiB
# fp32 copies of the largest layer's update resident at the peak: (per input, fixed). They cover the
# inputs' updates, PEFT's stacked, weighted and pruned copies, the SVD's float64 work and what the
# allocator keeps of them between layers, so they were fitted, not counted, on merges of 2 and 4
# SmolLM2-135M rank-16 adapters (docs/merge.md has the fit and its check). `cat` never forms a dense
# update.
_COPIES = {"linear": (1.0, 9.0), "svd": (1.0, 9.0), "dare_linear": (6.5, 0.0), "ties": (2.6, 16.8),
           "dare_ties": (2.6, 16.8), "cat": (0.0, 0.0)}


def merge_terms(shape: ModelShape, ranks: list[int], method: str, full: bool = False) -> dict[str, int]:
    """Named byte counts whose sum is the predicted peak RSS of `edgetune merge`."""
    largest = max(a * b for a, b in shape.linears())
    per_input, fixed = _COPIES["linear" if full else method]  # --full merges the update whole
    terms = {"runtime (torch)": MERGE_RUNTIME_BYTES,
             "input adapters (mapped)": sum(4 * shape.lora_params(r) for r in ranks),
             "one layer's updates": int(4 * largest * (per_input * len(ranks) + fixed))}
    if method == "cat" and not full:
        terms["one layer's factors"] = 4 * max(a + b for a, b in shape.linears()) * sum(ranks)
    if full:
        terms["base checkpoint (mapped)"] = DTYPE_BYTES.get(shape.file_dtype, 4) * shape.params
    return terms


def merge_peak(shape: ModelShape, ranks: list[int], method: str, full: bool = False) -> int:
    """Predicted peak RSS in bytes of merging adapters of `ranks` by `method` (the output's rank
    hardly matters: its factors are small and streamed to disk)."""
    return sum(merge_terms(shape, ranks, method, full).values())
