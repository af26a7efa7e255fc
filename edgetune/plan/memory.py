"""The memory model: peak resident memory of `edgetune train` for one setting, term by term.

What is predicted is the peak resident set size the kernel reports (VmHWM, `ru_maxrss`): anonymous
memory plus file pages that are mapped and resident, which includes the checkpoint file while
transformers memory-maps it during loading. The peak is the larger of two moments: loading (the
mapped checkpoint beside the weights being built from it) and a training step (weights, adapter,
optimizer state, saved activations, the loss chunk and temporary buffers).

Every constant below was measured on `edgetune train` (torch 2.13 CPU, transformers 5.23, peft 0.21,
bitsandbytes 0.50) and is checked by benchmarks/planner_accuracy.py.
"""

import dataclasses
from dataclasses import dataclass, field

from edgetune.constants import (DEQUANT_BUFFER_ELEMENTS, LEAN_MMAP_THRESHOLD, LOSS_BLOCK_ROWS,
                                LOSS_LOGITS_ELEMENTS, WIDEN_ELEMENTS)
from edgetune.methods import METHODS
from edgetune.plan import adapters
from edgetune.shape import DTYPE_BYTES, ModelShape

MiB = 2**20
# Resident memory of the runtime itself after importing torch + transformers + peft and building the
# model objects: measured ~305 MB anonymous plus ~145 MB of mapped shared libraries, less SmolLM2's
# tokenizer (46 MiB), which is counted apart.
RUNTIME_BYTES = 404 * MiB
# The fast tokenizer in memory, per vocabulary entry (tokens and merges): Gemma 3's 262,144 entries
# measured 322 MiB of RSS once loaded, SmolLM2's 49,152 entries 46 MiB (978 bytes each).
TOKENIZER_BYTES_PER_ENTRY = 1290
# bitsandbytes adds its own library and CPU kernels once imported (nf4, int8 or an 8-bit optimizer):
# measured with a 4-bit round trip and an 8-bit AdamW step beside the trainer's modules (docs/planner.md).
BNB_RUNTIME_BYTES = 12 * MiB
# Share of the budget kept free for what the model does not see (allocator fragmentation, the page
# cache of the data file, other threads' arenas): the planner fits `peak * (1 + SAFETY_MARGIN)`.
SAFETY_MARGIN = 0.10
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NF4_DQ_BLOCK = 256  # double quantization: absmax values quantized to 8 bits in blocks of 256
# Loading with conversion: linear weights in flight at once (read, widened, quantized), in units of
# the largest one in the compute dtype (fitted on a Llama-3.2-1B shape loading to nf4).
LOAD_IN_FLIGHT = 3
# Calibrated on measured runs (see the module docstring): gradient tensors of intermediate width in
# flight during one layer's backward pass, and dequantized copies of the largest 4/8-bit weight.
BACKWARD_I_COPIES = 4
DEQUANT_COPIES = 2
# Measured peak over saved activation bytes without checkpointing (fitted, see activation_bytes),
# with edgetune's fused LoRA layers and with PEFT's own forward (fitted before the fused layers).
HEAP_FACTOR = 1.5
PEFT_HEAP_FACTOR = 1.9
# With checkpointing, share of a layer's saved bytes still resident per layer at the peak (fitted),
# when its hidden-size activations are smaller than the trainer's lean-heap threshold and so stay in
# glibc's heap; from that size up they are unmapped when freed and nothing stays behind. The same
# two cases as the heap factor.
CKPT_RESIDUE = 0.15
PEFT_CKPT_RESIDUE = 0.55
# A CUDA context and its kernels take VRAM outside torch's allocator (not measured on this machine).
CUDA_CONTEXT_BYTES = 500 * MiB
QUANTS = ("none", "int8", "nf4")
OPTIMS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class Setting:
    """One training configuration: what the search varies and what the user fixes."""

    quant: str = "none"  # "none" keeps the base in the compute dtype
    rank: int = 16
    batch_size: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    optim: str = "adamw"
    dtype: str = "bf16"
    double_quant: bool = True
    device: str = "cpu"
    grad_accum: int = 1  # micro-batches per optimizer step
    method: str = "lora"  # edgetune.methods
    virtual_tokens: int = 20  # prompt, ptuning, prefix
    init_rank: int | None = None  # adalora (None: 1.5 x rank)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def positions(self) -> "Setting":
        """The setting as the decoder sees it: prompt and P-tuning put their virtual tokens before
        every example, so each row is that much longer."""
        if not METHODS[self.method].soft_prompt:
            return self
        return dataclasses.replace(self, seq_len=self.seq_len + self.virtual_tokens)


@dataclass(frozen=True)
class Breakdown:
    """Named byte counts of a training step, and the loading peak.

    `peak` is the predicted peak RSS (what `ru_maxrss` and the trainer's memory guard will read).
    `total` is what must fit the budget: that peak plus the safety margin. Loading peaks above the
    training step only while a converted base has tensors in flight; a checkpoint used in place is
    the weights themselves.
    """

    terms: dict[str, int] = field(default_factory=dict)
    load_peak: int = 0  # RSS while loading, mapped checkpoint pages included
    margin: float = SAFETY_MARGIN

    @property
    def train_peak(self) -> int:
        return sum(self.terms.values())

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak)

    @property
    def total(self) -> int:
        return int(self.peak * (1 + self.margin))


def compute_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def base_linear_bytes(shape: ModelShape, quant: str, dtype: str, double_quant: bool = True) -> int:
    """The decoder's linear weights in their stored format, block scales included."""
    n = shape.linear_params
    if quant == "none":
        return n * compute_bytes(dtype)
    if quant == "int8":
        # LLM.int8: one byte per weight plus one fp32 scale per output row.
        rows = shape.layers * sum(out for _, out in shape.linears())
        return n + 4 * rows
    blocks = -(-n // NF4_BLOCK)
    if not double_quant:
        return n // 2 + 4 * blocks
    # absmax as uint8 per block, one fp32 scale and offset per 256 blocks.
    return n // 2 + blocks + 8 * -(-blocks // NF4_DQ_BLOCK)


def embedding_bytes_per_param(shape: ModelShape, setting: Setting) -> int:
    """The embeddings' stored width: the compute dtype, except beside a quantized base on the CPU,
    where a narrower checkpoint dtype (bf16 beside fp32 compute) is kept and widened where used."""
    wide = compute_bytes(setting.dtype)
    if setting.quant == "none" or setting.device != "cpu":
        return wide
    return min(wide, DTYPE_BYTES.get(shape.file_dtype, wide))


def unquantized_bytes(shape: ModelShape, setting: Setting) -> int:
    """Embeddings and output layer (once when tied) at their stored width; norms in the compute dtype."""
    return (shape.embedding_params * embedding_bytes_per_param(shape, setting)
            + shape.small_params * compute_bytes(setting.dtype))


def trainable_tensors(shape: ModelShape, setting: Setting) -> list[int]:
    """Element counts of the method's trainable tensors (edgetune.plan.adapters)."""
    return adapters.trainable_tensors(shape, setting.method, setting.rank, setting.virtual_tokens,
                                      setting.init_rank)


def adapter_bytes(shape: ModelShape, setting: Setting) -> int:
    """The method's trainable tensors (LoRA's A and B, IA3's vectors, virtual tokens...), in fp32."""
    return 4 * sum(trainable_tensors(shape, setting))


def optimizer_bytes(shape: ModelShape, setting: Setting) -> int:
    """AdamW's two fp32 moments, or two uint8 states with one fp32 scale per block each."""
    return adapters.optimizer_bytes(trainable_tensors(shape, setting), setting.optim)


def layer_activation_bytes(shape: ModelShape, setting: Setting) -> dict[str, int]:
    """Bytes per token that one decoder layer keeps for its backward pass, by source.

    PEFT casts each adapted layer's input to the adapter's fp32 before lora_A, and autograd keeps
    each cast copy; with an fp32 compute dtype the cast is a no-op and q, k, v (and gate, up) share
    one saved input. o_proj's input is its own tensor where a packed row holds examples of different
    lengths (the per-length attention outputs are joined into a new tensor); where all have one length
    it is SDPA's saved output itself, q_dim values per token fewer than counted here. RMSNorm upcasts its input to fp32 and keeps it, with one fp32 inverse
    norm per token. A frozen bf16 linear layer keeps nothing, but bitsandbytes' 4/8-bit matmuls keep
    their input (in fp32, the same tensor as the adapter's). SDPA (flash kernel on the CPU) keeps q,
    k, v, its output and a logsumexp, no seq x seq matrix. tests/test_plan.py counts the saved
    tensors of real layers with autograd's hooks and holds these terms to them.
    """
    c = compute_bytes(setting.dtype)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    share = c == 4  # the cast is a no-op: consumers of one tensor share its saved copy
    # Prefix tuning trains on padded batches, where SDPA gets a mask and the keys and values are
    # repeated to every query head.
    kept_kv = q if setting.method == "prefix" else kv
    terms = {
        "norms": 4 * (h + 1) * shape.norms_per_layer,  # fp32 copy of each norm's input, its 1/rms
        **adapters.adapter_activations(shape, setting.method, setting.rank, c, share,
                                       setting.init_rank, fused_lora(setting)),
        "attention": c * (2 * q + 2 * kept_kv) + 4 * shape.heads,  # q, k, v, output; fp32 logsumexp
        "mlp": 3 * c * i,  # gate output (silu's input), silu output, up output
    }
    if shape.qk_norm:  # each head's query and key normalised: fp32 inputs and their 1/rms
        terms["attention"] += 4 * (q + kv) + 4 * (shape.heads + shape.kv_heads)
    if setting.method == "prefix":  # each layer's SDPA keeps its own mask over prefix and row
        terms["attention mask"] = c * (setting.seq_len + setting.virtual_tokens)
    if (setting.quant != "none" and not share and setting.device != "cpu"
            and METHODS[setting.method].folds):
        # bitsandbytes' GPU layers keep their own compute-dtype input beside the adapter's fp32
        # copy; in fp32 the two are one tensor (measured: the same saved bytes with and without
        # nf4). On the CPU the trainer's 4/8-bit matmuls keep nothing (edgetune.train.fourbit).
        terms["quantized inputs"] = c * (2 * h + q + i)
    return terms


def activation_bytes(shape: ModelShape, setting: Setting) -> int:
    """Resident memory for the decoder's activations at the peak of a training step.

    Without checkpointing every layer keeps its saved tensors; with checkpointing (one checkpoint per
    layer) each keeps its input and one layer at a time is recomputed. Measured peaks are higher
    than the saved bytes, by factors fitted on SmolLM2-135M runs: glibc keeps freed blocks of one
    step's temporaries in the heap between the saved tensors, and the next steps reuse them only in
    part (the peak grows from step 1 to step 2 by ~9%). With checkpointing the trainer unmaps
    blocks of 1 MiB and more when freed, so only activations smaller than that leave a residue.
    Layers on PEFT's own forward make more temporaries than edgetune's fused ones and leave more.
    """
    per_layer = sum(layer_activation_bytes(shape, setting).values())
    c = compute_bytes(setting.dtype)
    lean = fused_lora(setting) or not METHODS[setting.method].folds
    tokens = setting.positions.tokens
    if setting.method == "prefix":  # each example's prefix keys and values, repeated to every head
        per_layer += 2 * setting.virtual_tokens * shape.q_dim * c // setting.seq_len
    if setting.grad_checkpointing:
        in_heap = tokens * shape.hidden * 4 < LEAN_MMAP_THRESHOLD
        residue = (CKPT_RESIDUE if lean else PEFT_CKPT_RESIDUE) if in_heap else 0.0
        kept = shape.layers * (c * shape.hidden + residue * per_layer) + per_layer
        return int(tokens * kept)
    factor = HEAP_FACTOR if lean else PEFT_HEAP_FACTOR
    return int(tokens * shape.layers * per_layer * factor)


def recomputed_bytes(shape: ModelShape, setting: Setting) -> int:
    """With checkpointing, the one layer recomputed at a time: its saved tensors live through the
    whole backward pass (counted in activation_bytes)."""
    if not setting.grad_checkpointing:
        return 0
    return setting.positions.tokens * sum(layer_activation_bytes(shape, setting).values())


def gradient_bytes(shape: ModelShape, setting: Setting) -> int:
    """Adapter gradients beyond the memory that the backward pass has freed by the time they peak.

    The backward pass runs from the last layer to the first, and each layer frees its saved
    activations (its checkpoint, with checkpointing) as its adapters' gradients appear; the loss's
    tensors go first. The gradients are complete at the first layer, when those are gone, so only
    what they exceed them by adds to the peak (measured: a Qwen2.5-1.5B shape at rank 64 peaks at
    the end of the backward pass, docs/planner.md). With gradient accumulation the gradients of the
    first micro-batch stay through the next ones' activations, and count whole.
    """
    if setting.grad_accum > 1:
        return adapter_bytes(shape, setting)
    freed = (activation_bytes(shape, setting) - recomputed_bytes(shape, setting)
             + loss_bytes(shape, setting.positions))
    return max(0, adapter_bytes(shape, setting) - freed)


def fused_lora(setting: Setting) -> bool:
    """Whether the trainer's fused layers run (edgetune.train.lora, .dora): LoRA or rsLoRA with
    adapters in the compute dtype (fp32; bf16 compute keeps fp32 adapters) over a dense base, or a
    4/8-bit one on the CPU (widened into the shared buffer); DoRA over a dense base only;
    bitsandbytes' own layers on a GPU keep PEFT's forward. Methods that learn inputs have no adapter
    layers at all: they count as lean too (activation_bytes)."""
    quantized_cpu = setting.device == "cpu" and setting.method != "dora"
    return METHODS[setting.method].fused and setting.dtype == "fp32" and (setting.quant == "none"
                                                                          or quantized_cpu)


def backward_work_bytes(shape: ModelShape, setting: Setting) -> int:
    """Gradients in flight inside one layer's backward pass: a few intermediate-width tensors."""
    c = compute_bytes(setting.dtype)
    return setting.tokens * BACKWARD_I_COPIES * (c + 4) // 2 * shape.intermediate


def loss_bytes(shape: ModelShape, setting: Setting) -> int:
    """The chunked loss: hidden states of the label tokens, their gradient, and one logits block.

    The trainer keeps the final hidden states, a copy of those at label positions and a gradient of
    the same size; a chunk of tokens has an accumulator of the same width, and each block of its
    logits (LOSS_BLOCK_ROWS vocabulary rows, at most LOSS_LOGITS_ELEMENTS) lives in fp32, in bf16
    beside the matmul's own output. A narrow output layer is widened a block of rows at a time
    (edgetune.train.loss).
    """
    c = compute_bytes(setting.dtype)
    tokens = setting.tokens
    hidden = tokens * shape.hidden * (4 + 3 * c)  # final norm's fp32 input, output, selection, grad
    rows = min(shape.vocab, LOSS_BLOCK_ROWS)
    if embedding_bytes_per_param(shape, setting) < c:
        rows = max(1, min(rows, WIDEN_ELEMENTS // shape.hidden))
        hidden += rows * shape.hidden * c
    chunk = min(tokens, max(16, LOSS_LOGITS_ELEMENTS // rows))
    return hidden + chunk * shape.hidden * c + chunk * rows * (4 + (2 if c == 2 else 0))


def temporary_bytes(shape: ModelShape, setting: Setting) -> int:
    """Dequantized weights during a 4/8-bit matmul, in the compute dtype.

    On the CPU, 4/8-bit layers widen into one buffer they share, a block of rows at a time
    (edgetune.train.fourbit, edgetune.train.eightbit); elsewhere bitsandbytes makes new copies of
    the largest weight.
    """
    if setting.quant == "none":
        return 0
    largest = max(a * b for a, b in shape.linears())
    if setting.device == "cpu":
        return min(largest, DEQUANT_BUFFER_ELEMENTS) * compute_bytes(setting.dtype)
    return DEQUANT_COPIES * largest * compute_bytes(setting.dtype)


def load_peak_bytes(shape: ModelShape, setting: Setting, runtime: int, weights: int) -> int:
    """Peak while loading: the weights, and the tensors being converted.

    A checkpoint stored in the compute dtype is used in place (its memory-mapped pages are the
    weights). Any conversion (widening, or quantization) reads the file with pread, one tensor at a
    time (edgetune.train.model), so only the tensors in flight add to the weights built so far.
    """
    if setting.device != "cpu":
        return 0  # the file is read through host memory; VRAM only holds the converted weights
    in_place = setting.quant == "none" and DTYPE_BYTES.get(shape.file_dtype) == compute_bytes(setting.dtype)
    if in_place:
        return runtime + weights
    file_bytes = DTYPE_BYTES.get(shape.file_dtype, 2)
    linears = LOAD_IN_FLIGHT * max(a * b for a, b in shape.linears()) * compute_bytes(setting.dtype)
    end = runtime + weights + linears
    if embedding_bytes_per_param(shape, setting) == file_bytes:
        return end
    # A widened embedding is read whole, then converted. The checkpoint's tensors are read in name
    # order, where the embeddings (lm_head, model.embed_tokens) come before the decoder layers, so it
    # is in flight beside the embeddings alone (measured: a Gemma 3 270M shape widened from bf16
    # peaks in training, below the file's embedding beside all the weights).
    embeddings = shape.embedding_params * embedding_bytes_per_param(shape, setting)
    return max(end, runtime + embeddings + shape.token_embedding_params * file_bytes)


def breakdown(shape: ModelShape, setting: Setting) -> Breakdown:
    """Every term of the predicted peak for `setting` on `shape`."""
    uses_bnb = setting.quant != "none" or setting.optim != "adamw"
    runtime = RUNTIME_BYTES + (BNB_RUNTIME_BYTES if uses_bnb else 0)
    if setting.device != "cpu":
        runtime = CUDA_CONTEXT_BYTES
    base = base_linear_bytes(shape, setting.quant, setting.dtype, setting.double_quant)
    kept = unquantized_bytes(shape, setting)
    adapter = adapter_bytes(shape, setting)
    terms = {
        "runtime": runtime,
        "tokenizer": TOKENIZER_BYTES_PER_ENTRY * shape.vocab,
        "base weights": base,
        "embeddings+norms": kept,
        "adapter": adapter,
        "adapter grads": gradient_bytes(shape, setting),
        "optimizer": optimizer_bytes(shape, setting),
        "activations": activation_bytes(shape, setting),
        "backward": backward_work_bytes(shape, setting.positions),
        "loss": loss_bytes(shape, setting.positions),
        "dequant": temporary_bytes(shape, setting),
    }
    if setting.method == "adalora":
        terms["adalora scores"] = adapters.ADALORA_SCORES * adapter
    if setting.method == "dora" and not fused_lora(setting):
        terms["dora work"] = adapters.dora_work_bytes(shape)
    load = load_peak_bytes(shape, setting, runtime + terms["tokenizer"], base + kept)
    return Breakdown(terms, load)
