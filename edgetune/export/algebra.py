"""Adapter algebra for one layer: combine several LoRA updates, then factor the result into a LoRA.

Every method works on the dense update dW = scale * B @ A, never on A and B separately: combining
the A's and the B's on their own (what PEFT's add_weighted_adapter does for its non-SVD types) adds
cross terms B_i @ A_j that no adapter learned. The combinations are PEFT's own
(`peft.utils.merge_utils`): task arithmetic, TIES (trim to a density, elect signs, disjoint mean) and
DARE (drop at random, rescale by 1 / density). The result is factored back into rank R by a truncated
SVD, with the share of the update's energy (squared singular values) that rank R keeps.

The SVD is randomized (Halko et al., torch.svd_lowrank) with oversampling and power iterations: the
rank-R factors are the optimal ones to float precision whenever dW has rank <= R (every linear merge
at the sum of the input ranks) and near-optimal otherwise, at a fraction of a full SVD's time. Either
way the energy reported is exactly that of the factors written, since they project dW onto U_R.
"""

import functools
from pathlib import Path

METHODS = ("linear", "svd", "ties", "dare_ties", "dare_linear", "cat")
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")  # methods that trim or drop entries
SVD_OVERSAMPLE = 10  # columns beyond the rank the randomized SVD keeps
SVD_POWER_ITERATIONS = 4


def combine(updates: list, weights: list[float], method: str, density: float | None = None,
            seed: int = 0):
    """The weighted combination of one layer's dense updates by `method` (PEFT's functions)."""
    import warnings

    import torch

    merge_utils = peft_merge_utils()
    w = torch.tensor(weights, dtype=updates[0].dtype)
    if method in ("linear", "svd"):
        return merge_utils.task_arithmetic(updates, w)
    functions = {"ties": merge_utils.ties, "dare_ties": merge_utils.dare_ties,
                 "dare_linear": merge_utils.dare_linear}
    if method not in functions:
        raise ValueError(f"not a dense merge method: {method}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing: that is meant
        torch.manual_seed(seed)  # DARE's drops come from the global generator
        return functions[method](updates, w, density)


@functools.cache
def peft_merge_utils():
    """PEFT's `peft.utils.merge_utils`, which needs only torch.

    Importing it through the `peft` package also imports transformers, which costs more memory and
    CPU time than the merge itself (docs/merge.md). So the module is loaded from PEFT's own file on
    its own, and through the package only if that ever fails.
    """
    import importlib.util

    try:
        package = importlib.util.find_spec("peft")
        path = Path(next(iter(package.submodule_search_locations))) / "utils" / "merge_utils.py"
        spec = importlib.util.spec_from_file_location("edgetune_peft_merge_utils", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError, AttributeError, TypeError):
        from peft.utils import merge_utils

        return merge_utils


def factor(update, rank: int, seed: int = 0) -> tuple["object", "object", float]:
    """(A [rank, in], B [out, rank], share of energy kept): the rank-`rank` LoRA closest to `update`.

    The factors are balanced (B = U sqrt(S), A = sqrt(S) V^T) and carry the whole scale, so the
    adapter they form has scale 1 (alpha = rank). Computed in float64, returned in float32.
    """
    import torch

    out_dim, in_dim = update.shape
    if rank > min(out_dim, in_dim):
        raise ValueError(f"rank {rank} exceeds the update's {out_dim}x{in_dim} shape")
    work = update.to(torch.float64)
    total = float(work.square().sum())
    if total == 0.0:
        return torch.zeros(rank, in_dim), torch.zeros(out_dim, rank), 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(work, q=min(rank + SVD_OVERSAMPLE, out_dim, in_dim),
                                    niter=SVD_POWER_ITERATIONS)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    a, b = (v * root).T.contiguous(), u * root
    return a.to(torch.float32), b.to(torch.float32), min(1.0, float(s.square().sum()) / total)


def concatenate(pairs: list, weights: list[float]) -> tuple["object", "object"]:
    """`cat`: (A, B) with the inputs' ranks side by side, so B @ A = sum(w_i * scale_i * B_i @ A_i)
    exactly (no cross terms: B_i meets only A_i); the rank is the sum of the input ranks."""
    import torch

    a = torch.cat([p.a.to(torch.float32) for p in pairs], dim=0)
    b = torch.cat([(w * p.scale) * p.b.to(torch.float32) for p, w in zip(pairs, weights)], dim=1)
    return a, b
