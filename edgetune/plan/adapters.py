"""What each --method (edgetune.methods) adds to a training step's memory: its trainable tensors and
the activations its layers keep for the backward pass. Pure arithmetic over a ModelShape.

Tensor counts are PEFT's (tests/test_plan.py builds every method on real layers and counts).
Activations are bytes per token per decoder layer, by source, on top of what every method keeps
(norms, attention, MLP; edgetune.plan.memory): each is what autograd's saved-tensor hooks find on
real layers (tests/test_plan.py).
"""

from edgetune.methods import METHODS
from edgetune.shape import ModelShape

OPTIM_8BIT_BLOCK = 256  # bitsandbytes 8-bit optimizer state: one fp32 scale per 256 values
# AdaLoRA's allocator keeps three fp32 copies of every adapter tensor: the importance of each value,
# its running mean and its running uncertainty.
ADALORA_SCORES = 3


def initial_rank(rank: int, given: int | None) -> int:
    """AdaLoRA's initial rank: given, or half again the target rank (edgetune.train.config)."""
    return given or max(rank, round(1.5 * rank))


def trainable_tensors(shape: ModelShape, method: str, rank: int, virtual_tokens: int,
                      init_rank: int | None = None) -> list[int]:
    """Element counts of the method's trainable tensors, one entry per tensor."""
    h, layers = shape.hidden, shape.layers
    if method in ("lora", "rslora", "dora"):
        per_layer = [n for a, b in shape.linears() for n in (rank * a, rank * b)]
        if method == "dora":
            per_layer += [b for _, b in shape.linears()]  # one magnitude per output row
        return per_layer * layers
    if method == "adalora":
        r = initial_rank(rank, init_rank)
        return [n for a, b in shape.linears() for n in (r * a, r * b, r)] * layers
    if method == "ia3":
        return ia3_widths(shape) * layers
    n = virtual_tokens
    if method == "prompt":
        return [n * h]
    if method == "ptuning":  # PEFT's MLP encoder: three hidden-wide linear layers with biases
        return [n * h] + [h * h, h] * 3
    if method == "prefix":  # a key and a value per layer and virtual token
        return [n * layers * 2 * shape.kv_dim]
    raise ValueError(f"unknown method {method}")


def ia3_widths(shape: ModelShape) -> list[int]:
    """IA3's vectors per layer: the key and value outputs and down_proj's input (q, k, v as one
    output where the architecture fuses them)."""
    if shape.fused:
        return [shape.q_dim + 2 * shape.kv_dim, shape.intermediate]
    return [shape.kv_dim, shape.kv_dim, shape.intermediate]


def optimizer_bytes(tensors: list[int], optim: str) -> int:
    """AdamW's two fp32 moments, or two uint8 states with one fp32 scale per block each (blocks are
    per tensor; edgetune keeps every tensor in 8 bits, min_8bit_size=0)."""
    n = sum(tensors)
    if optim == "adamw":
        return 8 * n
    blocks = sum(-(-t // OPTIM_8BIT_BLOCK) for t in tensors)
    return 2 * n + 2 * 4 * blocks


def adapter_activations(shape: ModelShape, method: str, rank: int, c: int, share: bool,
                        init_rank: int | None = None, fused: bool = False) -> dict[str, int]:
    """Bytes per token per layer that the method's layers keep, by source (c: compute dtype bytes;
    share: an fp32 compute dtype, where the adapters' fp32 input casts are no-ops; fused: edgetune's
    own layers run, not PEFT's forward)."""
    h, i, q = shape.hidden, shape.intermediate, shape.q_dim
    if not METHODS[method].ranked:
        if method == "ia3":  # k and v outputs (scaled after the matmul), down_proj's input (before)
            return {"ia3 inputs": c * sum(ia3_widths(shape))}
        return {}
    r = initial_rank(rank, init_rank) if method == "adalora" else rank
    n_qkv, n_gu = (1, 1) if share or shape.fused else (3, 2)
    terms = {"lora inputs": 4 * (n_qkv * h + n_gu * h + q + i),
             "lora A outputs": 4 * r * len(shape.linears())}
    if method == "dora":  # the output before the magnitude's rescaling (PEFT: the base output and
        # the low-rank output, in fp32, apart)
        terms["dora outputs"] = (c if fused else c + 4) * sum(b for _, b in shape.linears())
    return terms


def dora_work_bytes(shape: ModelShape) -> int:
    """PEFT's DoRA forms B @ A through an identity matrix and the updated weight for its norm, one
    layer at a time: in x in and out x in fp32 temporaries for the widest layer (edgetune's fused
    DoRA layers need neither)."""
    return max(4 * a * (a + b) for a, b in shape.linears())
