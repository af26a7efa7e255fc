"""The planner's shapes, memory terms and search: exact numbers where exact numbers exist."""

import json
import math

import pytest
from conftest import ARCH_CONFIGS

from edgetune.constants import DEQUANT_BUFFER_ELEMENTS, LOSS_BLOCK_ROWS, LOSS_LOGITS_ELEMENTS
from edgetune.errors import EdgetuneError
from edgetune.methods import METHODS
from edgetune.plan import memory, search
from edgetune.plan.catalogue import CATALOGUE, all_shapes, catalogue_shape
from edgetune.plan.memory import Setting, breakdown
from edgetune.shape import shape_from_config, shape_from_gguf, shape_from_model_dir
from edgetune.units import format_size

# Parameter counts the model cards and safetensors indexes state.
KNOWN_PARAMS = {
    "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920, "qwen3-4b": 4_022_468_096, "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248, "gemma-2-2b": 2_614_341_888,
    "phi-3.5-mini": 3_821_079_552, "mistral-7b": 7_248_023_552,
    # Gemma 3: 270M from its model card; 1B as the hub's safetensors total for gemma-3-1b-it (and
    # llama.cpp's n_params for its GGUF); 4B is the text model only, llama.cpp's n_params for the
    # gemma-3-4b-it GGUF (the hub's 4,300,079,472 adds the SigLIP vision tower).
    "gemma3-270m": 268_098_176, "gemma3-1b": 999_885_952, "gemma3-4b": 3_880_263_168,
}


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_catalogue_parameter_counts(name):
    assert catalogue_shape(name).params == KNOWN_PARAMS[name]


def test_catalogue_has_the_issue_models():
    wanted = {"smollm2-135m", "smollm2-360m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b",
              "qwen2.5-3b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b",
              "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "gemma-2-2b", "phi-3.5-mini",
              "mistral-7b"}
    assert wanted <= set(CATALOGUE)
    with pytest.raises(EdgetuneError, match="not in the catalogue"):
        catalogue_shape("gpt-5")


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", True),
                                      ("qwen3", False), ("mistral", False), ("gemma3_text", True)])
def test_shape_counts_match_the_real_model(tiny_factory, arch, tie):
    import torch  # noqa: F401  (the reference side may use torch; the planner does not)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tiny_factory(arch, tie=tie)
    shape = shape_from_model_dir(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.tied == tie
    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params(8) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_gguf_header_gives_the_shape(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_feed_forward_length(128)
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = shape_from_gguf(path)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim,
            shape.intermediate, shape.vocab, shape.tied) == (64, 2, 4, 2, 16, 128, 300, True)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(EdgetuneError, match="'bert' is not one the planner knows"):
        shape_from_config({"model_type": "bert"})


SHAPE = catalogue_shape("qwen2.5-0.5b")
N = SHAPE.linear_params


def test_base_weights_by_format():
    rows = SHAPE.layers * sum(out for _, out in SHAPE.linears())
    assert memory.base_linear_bytes(SHAPE, "none", "fp32") == 4 * N
    assert memory.base_linear_bytes(SHAPE, "none", "bf16") == 2 * N
    assert memory.base_linear_bytes(SHAPE, "int8", "bf16") == N + 4 * rows
    blocks = N // 64  # every linear layer of this shape is a multiple of 64 weights
    assert memory.base_linear_bytes(SHAPE, "nf4", "bf16", double_quant=False) == N // 2 + 4 * blocks
    double = memory.base_linear_bytes(SHAPE, "nf4", "bf16", double_quant=True)
    assert double == N // 2 + blocks + 8 * -(-blocks // 256)
    # Double quantization saves ~0.37 bits per weight (4.5 -> ~4.127 bits).
    assert 4.12 < 8 * double / N < 4.13


def test_embeddings_width_and_tied_count_once():
    untied = shape_from_config({**CATALOGUE["qwen2.5-0.5b"][1], "tie_word_embeddings": False})
    bf16, fp32 = Setting(dtype="bf16"), Setting(dtype="fp32")
    tied_bytes = memory.unquantized_bytes(SHAPE, bf16)
    assert memory.unquantized_bytes(untied, bf16) - tied_bytes == 2 * SHAPE.vocab * SHAPE.hidden
    assert memory.unquantized_bytes(SHAPE, fp32) == 2 * tied_bytes
    # Quantizing the base leaves this term alone in bf16; in fp32 on the CPU the bf16 checkpoint's
    # embeddings stay bf16 (widened where used), while the norms follow the compute dtype.
    assert breakdown(SHAPE, Setting(quant="nf4")).terms["embeddings+norms"] == tied_bytes
    nf4_fp32 = Setting(quant="nf4", dtype="fp32")
    assert memory.unquantized_bytes(SHAPE, nf4_fp32) == tied_bytes + 2 * SHAPE.small_params
    on_gpu = Setting(quant="nf4", dtype="fp32", device="cuda")
    assert memory.unquantized_bytes(SHAPE, on_gpu) == 2 * tied_bytes


def test_adapter_gradients_and_optimizer_state():
    n = SHAPE.lora_params(16)
    assert n == 16 * SHAPE.layers * (896 * 9 + 128 * 2 + 4864 * 3)  # q k v o gate up down
    terms = breakdown(SHAPE, Setting(rank=16)).terms
    assert terms["adapter"] == 4 * n
    # The gradients fill what the backward pass frees of the activations: only the excess counts.
    assert terms["adapter grads"] == 0 < 4 * n < terms["activations"]
    tight = Setting(rank=64, batch_size=1, seq_len=16, grad_checkpointing=True)
    freed = (memory.activation_bytes(SHAPE, tight) - memory.recomputed_bytes(SHAPE, tight)
             + memory.loss_bytes(SHAPE, tight))
    grads = breakdown(SHAPE, tight).terms["adapter grads"]
    assert grads == memory.adapter_bytes(SHAPE, tight) - freed > 0
    # Accumulating, the first micro-batch's gradients stay through the next one's activations.
    assert breakdown(SHAPE, Setting(rank=16, grad_accum=2)).terms["adapter grads"] == 4 * n
    assert terms["optimizer"] == 8 * n
    eight = memory.optimizer_bytes(SHAPE, Setting(rank=16, optim="adamw8bit"))
    assert 2 * n < eight < 2.07 * n  # uint8 states plus one fp32 scale per 256 values


def test_activations_checkpointing_and_attention_terms():
    plain = Setting(batch_size=4, seq_len=256, dtype="bf16")
    ckpt = Setting(batch_size=4, seq_len=256, dtype="bf16", grad_checkpointing=True)
    assert memory.activation_bytes(SHAPE, ckpt) < 0.5 * memory.activation_bytes(SHAPE, plain)
    double = Setting(batch_size=8, seq_len=256, dtype="bf16")
    assert abs(memory.activation_bytes(SHAPE, double) - 2 * memory.activation_bytes(SHAPE, plain)) <= 1
    layer = memory.layer_activation_bytes(SHAPE, plain)
    # SDPA's flash kernel keeps no seq x seq matrix: per-token bytes do not grow with seq_len.
    assert layer == memory.layer_activation_bytes(SHAPE, Setting(seq_len=4096, dtype="bf16"))
    # bitsandbytes' GPU layers keep their own input; the trainer's CPU 4/8-bit matmuls keep none.
    assert "quantized inputs" in memory.layer_activation_bytes(SHAPE, Setting(quant="nf4", device="cuda"))
    for quant in ("nf4", "int8"):
        assert "quantized inputs" not in memory.layer_activation_bytes(SHAPE, Setting(quant=quant))
    # In fp32 bitsandbytes and the adapter save the very same input tensor.
    fp32 = memory.layer_activation_bytes(SHAPE, Setting(quant="nf4", dtype="fp32"))
    assert fp32 == memory.layer_activation_bytes(SHAPE, Setting(dtype="fp32"))


def saved_activation_bytes(arch: str, layers: int, tokens: int, dtype, method: str = "lora") -> int:
    """Bytes autograd keeps for the backward pass of the trainer's forward (rank 8 on every linear
    layer for the LoRA family, 5 virtual tokens for learned inputs; a packed row of two examples, or
    two padded rows for prefix tuning), parameters left out."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from edgetune.train.adapters import hooks, peft_config
    from edgetune.train.attention import use_segment_attention
    from edgetune.train.config import TrainConfig
    from edgetune.train.data import Example, collate, pack
    from edgetune.train.loss import causal_lm_loss
    from edgetune.train.model import add_adapter

    config = getattr(transformers, ARCH_CONFIGS[arch][0])(num_hidden_layers=layers, **LAYER_DIMS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).requires_grad_(False)
    settings = TrainConfig(data="unused.jsonl", method=method, rank=8, virtual_tokens=5,
                           **({"init_rank": 8} if method == "adalora" else {}))
    model = add_adapter(model, peft_config(settings, 10), 0, False, fuse=METHODS[method].fused,
                        method_name=method)  # adapters stay fp32, as trained
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 256, (tokens,)).tolist()
    packs = hooks(model, method).packs
    if packs:  # two examples of different lengths: two SDPA calls, whose outputs are joined into a
        # new tensor for o_proj (examples of one length share one call, and o_proj's input is then
        # SDPA's output)
        cut = tokens * 3 // 8
        batch = pack([Example(ids[:cut], ids[:cut]), Example(ids[cut:], ids[cut:])])
        use_segment_attention(model)
    else:  # two padded rows of one length
        half = tokens // 2
        batch = collate([Example(ids[:half], ids[:half]), Example(ids[half:], ids[half:])], 0)
    saved: dict[int, object] = {}  # storages kept alive, so a freed one's address is not reused

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        causal_lm_loss(model, batch)
    return sum(storage.nbytes() for storage in saved.values())


LAYER_DIMS = {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256, "max_position_embeddings": 512}


@pytest.mark.parametrize("arch,dtype", [("llama", "fp32"), ("llama", "bf16"), ("qwen2", "fp32"),
                                        ("qwen3", "fp32"), ("qwen3", "bf16"), ("gemma3_text", "fp32"),
                                        ("gemma3_text", "bf16")])
def test_layer_activations_match_autograd_saved_tensors(arch, dtype):
    """One decoder layer's saved bytes per token, measured live (three layers minus two) with
    autograd's saved-tensor hooks, equal the planner's terms."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tokens = 128
    measured = (saved_activation_bytes(arch, 3, tokens, torch_dtype)
                - saved_activation_bytes(arch, 2, tokens, torch_dtype)) / tokens
    shape = shape_from_config({"model_type": arch, "num_hidden_layers": 3, **LAYER_DIMS})
    if arch == "gemma3_text":  # each norm keeps its (1 + w) once per layer, not per token
        measured -= 4 * (shape.norms_per_layer * shape.hidden + 2 * shape.head_dim) / tokens
    predicted = sum(memory.layer_activation_bytes(shape, Setting(rank=8, dtype=dtype)).values())
    assert predicted == measured


@pytest.mark.parametrize("method", ["dora", "adalora", "ia3", "prompt", "ptuning", "prefix"])
def test_method_activations_match_autograd_saved_tensors(method):
    """Per token and layer, what each method's layers keep (two token counts apart, three layers
    minus two, so that per-layer and per-example tensors drop out) equals the planner's terms."""
    import torch

    def per_layer(tokens: int) -> int:
        return (saved_activation_bytes("llama", 3, tokens, torch.float32, method)
                - saved_activation_bytes("llama", 2, tokens, torch.float32, method))

    shape = shape_from_config({"model_type": "llama", "num_hidden_layers": 3, **LAYER_DIMS})
    setting = Setting(rank=8, dtype="fp32", method=method, virtual_tokens=5, init_rank=8, seq_len=64)
    predicted = sum(memory.layer_activation_bytes(shape, setting).values())
    if method == "prefix":  # padded rows of 64: a mask per layer over prefix and row (in the terms),
        # and each row's prefix keys and values repeated to the 4 query heads
        assert per_layer(128) == 128 * predicted + 2 * 2 * 5 * shape.q_dim * 4
        return
    measured = (per_layer(256) - per_layer(128)) / 128
    assert predicted == measured
    if METHODS[method].soft_prompt:  # the virtual positions before each of the two examples count
        assert per_layer(128) == (128 + 2 * 5) * measured


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "ia3", "prompt", "ptuning", "prefix"])
def test_trainable_tensors_match_peft(arch, method, tiny_factory):
    import torch

    from edgetune.train.adapters import peft_config
    from edgetune.train.config import TrainConfig
    from edgetune.train.model import add_adapter, load_base, parameter_counts

    folder = tiny_factory(arch)
    config = TrainConfig(data="unused.jsonl", method=method, rank=2, virtual_tokens=5,
                         **({"init_rank": 4} if method == "adalora" else {}))
    model = add_adapter(load_base(folder, torch.float32, "cpu"), peft_config(config, 10), 0, False,
                        fuse=False, method_name=method)
    setting = Setting(rank=2, method=method, virtual_tokens=5, init_rank=4)
    assert parameter_counts(model)[0] == sum(memory.trainable_tensors(shape_from_model_dir(folder),
                                                                      setting))


def test_method_terms_in_the_breakdown():
    lora = breakdown(SHAPE, Setting(rank=16, dtype="fp32"))
    ada = breakdown(SHAPE, Setting(rank=16, dtype="fp32", method="adalora"))
    assert ada.terms["adalora scores"] == 3 * ada.terms["adapter"] > 3 * lora.terms["adapter"]
    dora = breakdown(SHAPE, Setting(rank=16, dtype="fp32", method="dora"))
    assert dora.terms["adapter"] - lora.terms["adapter"] == 4 * SHAPE.layers * sum(
        b for _, b in SHAPE.linears())
    assert breakdown(SHAPE, Setting(rank=16, dtype="bf16", method="dora")).terms["dora work"] > 0
    assert "dora work" not in dora.terms  # the fused layers build no weight-sized temporaries
    ia3 = breakdown(SHAPE, Setting(dtype="fp32", method="ia3"))
    assert ia3.terms["adapter"] == 4 * SHAPE.layers * (2 * SHAPE.kv_dim + SHAPE.intermediate)
    prompt = breakdown(SHAPE, Setting(dtype="fp32", method="prompt", virtual_tokens=20, seq_len=512))
    assert prompt.terms["adapter"] == 4 * 20 * SHAPE.hidden
    longer = breakdown(SHAPE, Setting(dtype="fp32", seq_len=532)).terms
    # 20 virtual tokens cost what 20 more tokens do, without an adapted layer's inputs
    assert prompt.terms["loss"] == longer["loss"] and prompt.terms["backward"] == longer["backward"]
    assert prompt.terms["activations"] < longer["activations"]


def test_plans_for_other_methods():
    ia3 = search.choose(SHAPE, 8 * 2**30, seq_len=256, target_batch=8, dtype="fp32", method="ia3")
    assert "IA3" in ia3.describe() and "--method ia3" in " ".join(ia3.train_flags())
    assert "--rank" not in ia3.train_flags()
    prompt = search.choose(SHAPE, 8 * 2**30, seq_len=256, target_batch=8, dtype="fp32",
                           method="prompt", virtual_tokens=30)
    assert "prompt tuning, 30 virtual tokens" in prompt.describe()
    assert prompt.train_flags()[prompt.train_flags().index("--virtual-tokens") + 1] == "30"


def test_loss_term_is_one_chunk_not_the_whole_batch():
    small = memory.loss_bytes(SHAPE, Setting(batch_size=1, seq_len=64, dtype="fp32"))
    big = memory.loss_bytes(SHAPE, Setting(batch_size=16, seq_len=1024, dtype="fp32"))
    rows = LOSS_BLOCK_ROWS
    assert small == 64 * SHAPE.hidden * 16 + 64 * SHAPE.hidden * 4 + 64 * rows * 4
    assert big - 16 * 1024 * SHAPE.hidden * 16 == LOSS_LOGITS_ELEMENTS * 4 + 1024 * SHAPE.hidden * 4
    # A narrow output layer adds one widened block of rows.
    narrow = memory.loss_bytes(SHAPE, Setting(quant="nf4", batch_size=1, seq_len=64, dtype="fp32"))
    assert narrow == small + rows * SHAPE.hidden * 4


def test_dequantized_buffer_only_when_quantized():
    assert memory.temporary_bytes(SHAPE, Setting(quant="none")) == 0
    largest = 896 * 4864
    # One shared buffer on the CPU, smaller than this largest weight (edgetune.train.fourbit);
    # bitsandbytes' own copies elsewhere.
    assert largest > DEQUANT_BUFFER_ELEMENTS
    assert memory.temporary_bytes(SHAPE, Setting(quant="nf4", dtype="bf16")) == 2 * DEQUANT_BUFFER_ELEMENTS
    on_gpu = Setting(quant="nf4", dtype="bf16", device="cuda")
    assert memory.temporary_bytes(SHAPE, on_gpu) == memory.DEQUANT_COPIES * 2 * largest


def test_runtime_margin_and_load_peak():
    b = breakdown(SHAPE, Setting(dtype="bf16"))
    assert b.terms["runtime"] == memory.RUNTIME_BYTES
    assert breakdown(SHAPE, Setting(quant="nf4")).terms["runtime"] > memory.RUNTIME_BYTES
    assert b.total == int(b.peak * (1 + memory.SAFETY_MARGIN))
    # A bf16 checkpoint loaded as nf4 is read a tensor at a time: the quantized weights and the
    # linear weights in flight, not the whole file beside them.
    nf4 = breakdown(SHAPE, Setting(quant="nf4", dtype="bf16"))
    weights = nf4.terms["base weights"] + nf4.terms["embeddings+norms"]
    largest = 896 * 4864 * 2
    runtime = nf4.terms["runtime"] + nf4.terms["tokenizer"]
    assert nf4.terms["tokenizer"] == memory.TOKENIZER_BYTES_PER_ENTRY * SHAPE.vocab
    assert nf4.load_peak == runtime + weights + memory.LOAD_IN_FLIGHT * largest
    assert nf4.load_peak < runtime + 2 * SHAPE.params  # less than the file alone
    assert nf4.peak == max(nf4.load_peak, nf4.train_peak)
    # Used in place when nothing converts it: the mapped file is the weights.
    in_place = breakdown(SHAPE, Setting(dtype="bf16"))
    assert in_place.load_peak == in_place.terms["runtime"] + in_place.terms["tokenizer"] + 2 * SHAPE.params
    # Widened from bf16 to fp32: the embedding is read first, beside no decoder weights yet.
    wide = breakdown(SHAPE, Setting(dtype="fp32"))
    runtime = wide.terms["runtime"] + wide.terms["tokenizer"]
    assert wide.load_peak == runtime + 4 * SHAPE.params + memory.LOAD_IN_FLIGHT * largest * 2
    # One small decoder layer under a 262k x 640 embedding: the embedding in flight beside its fp32
    # copy is the loading peak.
    short = shape_from_config({**CATALOGUE["gemma3-270m"][1], "num_hidden_layers": 1})
    wide = breakdown(short, Setting(dtype="fp32"))
    runtime = wide.terms["runtime"] + wide.terms["tokenizer"]
    assert wide.load_peak == runtime + short.token_embedding_params * (4 + 2)
    assert wide.load_peak > runtime + 4 * short.params


def test_choose_prefers_precision_then_rank_then_speed():
    huge = search.choose(SHAPE, 64 * 2**30, seq_len=256, target_batch=8, dtype="bf16")
    assert (huge.quant, huge.optim, huge.rank, huge.grad_checkpointing, huge.batch_size,
            huge.grad_accum) == ("none", "adamw", 64, False, 8, 1)
    plans = search.ranked(SHAPE, 3 * 2**30, seq_len=256, target_batch=8, dtype="bf16")
    keys = [search._preference(p) for p in plans]
    assert keys == sorted(keys) and plans[0].memory.total <= 3 * 2**30
    tight = search.choose(SHAPE, 2 * 2**30, seq_len=256, target_batch=8, dtype="bf16")
    assert tight.memory.total <= 2 * 2**30
    assert tight.batch_size * tight.grad_accum >= 8


def test_nothing_fits_names_the_budget_and_the_fix():
    shape = catalogue_shape("qwen2.5-7b")
    with pytest.raises(EdgetuneError) as info:
        search.choose(shape, 2 * 2**30, seq_len=512, dtype="bf16")
    message = str(info.value)
    least = search.smallest(shape, seq_len=512, dtype="bf16")
    assert message.startswith("--ram 2.00gb is too small: qwen2.5-7b needs --ram")
    needs = math.ceil(least.memory.total / 2**30 * 100) / 100  # rounded up: that budget fits
    assert f"needs --ram {needs:.2f}gb with nf4, rank 4, batch 1" in message
    assert "checkpointing" in message and "smaller model" in message
    assert search.smallest(shape, seq_len=512, dtype="bf16").memory.total <= needs * 2**30


def test_budget_below_the_runtime_names_it_and_the_least_that_fits():
    with pytest.raises(EdgetuneError) as info:
        search.choose(SHAPE, 300 * 2**20, seq_len=512, dtype="bf16")
    message = str(info.value)
    assert message.startswith("--ram 300mb is less than the trainer's runtime alone (404.0 MiB")
    assert "qwen2.5-0.5b needs --ram 1." in message


def test_sequence_longer_than_the_model_holds_is_refused(tiny_model):
    shape = shape_from_model_dir(tiny_model)
    assert shape.max_positions == 256
    search.choose(shape, 8 * 2**30, seq_len=256, dtype="fp32")
    with pytest.raises(EdgetuneError, match=r"--seq-len 257 is longer than llama holds "
                                            r"\(max_position_embeddings 256\): use --seq-len 256 or less"):
        search.choose(shape, 8 * 2**30, seq_len=257, dtype="fp32")


def test_too_small_suggests_a_shorter_sequence_when_that_fits():
    shape = catalogue_shape("smollm2-135m")
    need_long = search.smallest(shape, seq_len=4096, dtype="fp32").memory.total
    need_short = search.smallest(shape, seq_len=2048, dtype="fp32").memory.total
    budget = (need_long + need_short) // 2
    with pytest.raises(EdgetuneError, match="try --seq-len 2048"):
        search.choose(shape, budget, seq_len=4096, dtype="fp32")


def test_plan_flags_are_valid_train_flags():
    from edgetune.cli import parser
    from edgetune.config import build, overrides_from
    from edgetune.train.config import TrainConfig

    plan = search.choose(SHAPE, 3 * 2**30, seq_len=256, target_batch=8, dtype="bf16")
    args = parser("train").parse_args(["train", "--data", "x.jsonl", *plan.train_flags()])
    config = build(TrainConfig, None, overrides_from(args, TrainConfig))
    assert (config.quant, config.rank, config.batch_size, config.grad_accum, config.optim,
            config.grad_checkpointing, config.seq_len) == (
        plan.quant, plan.rank, plan.batch_size, plan.grad_accum, plan.optim,
        plan.grad_checkpointing, plan.seq_len)


def test_every_catalogue_model_fits_somewhere():
    for shape in all_shapes():
        plan = search.smallest(shape, seq_len=256, dtype="bf16")
        # Batch 2 can beat batch 1: at 256 tokens a small model's checkpointed activations stay in
        # the heap (CKPT_RESIDUE), at 512 they are unmapped when freed.
        assert plan.quant == "nf4" and plan.batch_size <= 2 and plan.grad_checkpointing
        # A higher rank only where loading, not training, sets the peak: then ranks tie.
        assert plan.rank == 4 or plan.memory.peak == plan.memory.load_peak
        assert json.dumps(plan.memory.terms)  # plain ints, serialisable


def test_guard_suggestion_scales_predictions_by_the_measurement_and_differs_from_the_run():
    budget = 3 * 2**30
    chosen = search.choose(SHAPE, budget, seq_len=256, target_batch=8, dtype="bf16")
    predicted = chosen.memory.peak
    line = search.suggestion(SHAPE, budget, ran=chosen.setting, measured_peak=int(1.3 * predicted),
                             target_batch=8)
    assert line.startswith(f"the planner predicted {format_size(predicted)} for these settings; "
                           f"measured {format_size(int(1.3 * predicted))} (1.30x)")
    assert "scaled by 1.30, `edgetune plan` suggests" in line and chosen.describe() not in line
    suggested = next(p for p in search.candidates(SHAPE, seq_len=256, target_batch=8, dtype="bf16")
                     if line.endswith(" ".join(p.train_flags())))
    assert suggested.memory.total * 1.3 <= budget
    # The same settings with a measurement at or under the prediction: the next best unscaled.
    under = search.suggestion(SHAPE, budget, ran=chosen.setting, measured_peak=predicted // 2,
                              target_batch=8)
    assert "(0.50x); with predictions, `edgetune plan` suggests" in under
    assert chosen.describe() not in under
    nothing = search.suggestion(SHAPE, 2**28, ran=chosen.setting, measured_peak=2 * predicted,
                                target_batch=8)
    assert "nothing else fits --ram 256.0 MiB" in nothing


def test_checkpointed_activations_leave_a_heap_residue_only_below_the_lean_threshold():
    per_layer = sum(memory.layer_activation_bytes(SHAPE, Setting(dtype="fp32")).values())
    for tokens, residue in ((64, memory.CKPT_RESIDUE), (2048, 0.0)):  # 229 KiB and 7 MiB blocks
        setting = Setting(batch_size=1, seq_len=tokens, dtype="fp32", grad_checkpointing=True)
        expected = tokens * (SHAPE.layers * (4 * SHAPE.hidden + residue * per_layer) + per_layer)
        assert memory.activation_bytes(SHAPE, setting) == int(expected)


def test_layers_on_peft_forward_keep_the_larger_heap_factor():
    """bf16 compute (fp32 adapters) and 4/8-bit on a GPU run PEFT's forward, not the fused one;
    4/8-bit layers on the CPU fuse."""
    per_layer = {}
    for setting in (Setting(dtype="fp32"), Setting(dtype="bf16"), Setting(dtype="fp32", quant="int8"),
                    Setting(dtype="fp32", quant="nf4"), Setting(dtype="fp32", quant="nf4", device="cuda")):
        saved = sum(memory.layer_activation_bytes(SHAPE, setting).values())
        per_layer[setting] = memory.activation_bytes(SHAPE, setting) / (setting.tokens * SHAPE.layers * saved)
    assert [round(f, 3) for f in per_layer.values()] == [memory.HEAP_FACTOR, memory.PEFT_HEAP_FACTOR,
                                                         memory.HEAP_FACTOR, memory.HEAP_FACTOR,
                                                         memory.PEFT_HEAP_FACTOR]
    assert memory.HEAP_FACTOR < memory.PEFT_HEAP_FACTOR


def test_gemma3_sliding_window_kv_cache():
    """llama.cpp keeps the window (plus a prompt batch) for local layers; ONNX keeps everything."""
    from edgetune.devices.selection import PREFILL_BATCH, as_shape

    shape = catalogue_shape("gemma3-270m")
    assert (shape.sliding_window, shape.sliding_layers) == (512, 15)
    inference = as_shape(shape)
    per_layer = 2 * 1 * 256 * 2  # K and V, one KV head of 256, f16
    assert inference.kv_bytes(32768, 2) == per_layer * (3 * 32768 + 15 * (512 + PREFILL_BATCH))
    assert inference.kv_bytes(32768, 2, windowed=False) == per_layer * 18 * 32768
    assert inference.kv_bytes(256, 2) == per_layer * 18 * 256  # within the window: all layers


def test_gemma3_gguf_header_gives_the_window(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "g.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    for method, value in (("add_embedding_length", 64), ("add_block_count", 12), ("add_head_count", 4),
                          ("add_head_count_kv", 1), ("add_feed_forward_length", 128),
                          ("add_key_length", 16), ("add_sliding_window", 32)):
        getattr(writer, method)(value)
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    shape = shape_from_gguf(path)  # llama.cpp's default pattern: every 6th layer global
    assert (shape.sliding_window, shape.sliding_layers, shape.qk_norm, shape.norms_per_layer) == (32, 10, True, 4)
