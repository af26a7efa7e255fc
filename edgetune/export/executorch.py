"""ExecuTorch export: a merged HF folder -> a .pte program for ExecuTorch's LLM runner (Android, iOS).

transformers' own exportable wrapper (static KV cache, dynamic sequence length) is traced with
torch.export, lowered to XNNPACK with executorch.exir and written with the metadata methods ExecuTorch's
text runner reads (get_max_seq_len, get_eos_ids, use_kv_cache, ...). 8da4w and 8da8w first quantize
every linear layer with torchao: activations to 8 bits per token at run time, weights to 4 bits in
groups of 32 or to 8 bits per output channel, which XNNPACK runs as integer matmuls. The embedding stays
fp32.

Each type is a folder executorch-<type>/: model.pte, tokenizer.json (what the runner tokenizes with)
and the tokenizer config and chat template an app renders prompts with. The runner takes a rendered
prompt, so the template travels beside the program.
"""

import shutil
import warnings
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export import phone
from edgetune.export.report import Verification

TYPES = ("fp32", "8da4w", "8da8w")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
GROUP = 32  # 4-bit weight group: XNNPACK's blockwise kernels take multiples of 32


def export_executorch(model_dir: Path, out_dir: Path, kind: str, ctx: int, stop_ids: list[int]) -> str:
    """Write `out_dir`/model.pte of type `kind` with a `ctx`-token KV cache; returns a report note."""
    if kind not in TYPES:
        raise EdgetuneError(f"ExecuTorch type {kind!r} is not one of {', '.join(TYPES)}")
    phone.require("executorch")
    config = phone.read_config(model_dir, "executorch")
    length = phone.cache_length(config, ctx)
    clock = phone.Clock()
    model = _load(model_dir)
    if kind != "fp32":
        _quantize(model, kind)
    exported = _export(model, length)
    clock.lap("export")
    program = _lower(exported, _metadata(config, length, stop_ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "model.pte", "wb") as f:
        program.write_to_file(f)
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, out_dir / name)
    clock.lap("lowering to XNNPACK")
    return f"KV cache {length} tokens; {clock}"


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # transformers' exportable wrapper allocates the cache up front only for the static cache.
    model.generation_config.cache_implementation = "static"
    model.generation_config.use_cache = True
    return model


def _quantize(model, kind: str) -> None:
    """torchao's 8-bit dynamic activation, 4- or 8-bit weight layers in place of every nn.Linear."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if kind == "8da4w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                       weight_granularity=PerGroup(GROUP))
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                       weight_granularity=PerAxis(0))
    quantize_(model, config)


def _export(model, length: int):
    """torch.export of the static-cache wrapper with a dynamic number of tokens per call."""
    import torch
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=length)
    tokens = torch.export.Dim("tokens", max=length - 1)
    ids = torch.tensor([[1, 2]], dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers' output-capturing hook is a side effect dynamo reports on every export
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
        # strict export: the non-strict tracer fails on the cache wrapper ("expected compiled_fn to
        # be GraphModule") in the torch this was built with.
        return wrapper.export(input_ids=ids, cache_position=torch.arange(2, dtype=torch.long),
                              dynamic_shapes={"input_ids": {1: tokens}, "cache_position": {0: tokens}},
                              strict=True)


def _metadata(config: dict, length: int, stop_ids: list[int]) -> dict:
    """The constant methods ExecuTorch's text runner reads to size its buffers and stop decoding."""
    metadata = {"get_max_seq_len": length - 1, "get_max_context_len": length,
                "get_vocab_size": config["vocab_size"], "get_eos_ids": stop_ids, "use_kv_cache": True,
                "enable_dynamic_shape": True, "get_max_batch_size": 1,
                "get_n_layers": config["num_hidden_layers"]}
    if config.get("bos_token_id") is not None:
        metadata["get_bos_id"] = config["bos_token_id"]
    return metadata


def _lower(exported, metadata: dict):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with warnings.catch_warnings():
        # the KV cache is a mutated buffer whose initial contents do not matter (zeros are written)
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        warnings.filterwarnings("ignore", message=".*treespec.* is deprecated", category=FutureWarning)
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=metadata)
        return edge.to_executorch()


def verify_executorch(out_dir: Path, kind: str, reference, chat: phone.Chat | None,
                      note: str = "") -> Verification:
    """Run out_dir/model.pte in ExecuTorch's runtime and its text runner; the report row."""
    path = Path(out_dir) / "model.pte"
    with phone.native_output():  # the runtime logs CPU probing to stderr
        run = _run(path, reference.ids, chat)
    return phone.verification(f"{Path(out_dir).name}/model.pte", f"executorch {kind}", kind,
                              path.stat().st_size, run, reference, chat, note)


def _run(path: Path, ids: list[int], chat: phone.Chat | None) -> phone.Run:
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    forward = Runtime.get().load_program(str(path)).load_method("forward")

    def call(tokens: list[int], start: int):
        out = forward.execute([torch.tensor([tokens], dtype=torch.long),
                               torch.arange(start, start + len(tokens), dtype=torch.long)])
        return out[0][0].float().numpy()

    steps = np.stack([call([token], i)[-1] for i, token in enumerate(ids[:-1])])
    split = phone.prefill_split(len(ids))
    prefilled = [call(ids[:split], 0)]  # every position's logits come out of the prefill
    for i in range(split, min(split + phone.DECODE_AFTER_PREFILL, len(ids) - 1)):
        prefilled.append(call([ids[i]], i))
    reply, prompt_tokens, speed = runner_chat(path, chat) if chat else ("", None, None)
    return phone.Run(steps, np.concatenate(prefilled), 0, reply, prompt_tokens, speed)


def runner_chat(path: Path, chat: phone.Chat) -> tuple[str, int | None, float | None]:
    """(reply, prompt tokens, decode tokens/s) from ExecuTorch's TextLLMRunner, greedy."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(path), str(path.parent / "tokenizer.json"))
    stats = []
    config = GenerationConfig(echo=False, max_new_tokens=phone.CHAT_TOKENS, temperature=0.0)
    # The runner prints the reply to stdout itself (and hands it to a callback only as str, which
    # fails on a token that ends inside a UTF-8 character): read it from there.
    with phone.native_output() as output:
        runner.generate(chat.prompt, config, stats_callback=stats.append)
        reply = phone.reply_text(output()[0], chat)
    if not stats:
        return reply, None, None
    s = stats[-1]
    # The first reply token comes out of the prefill; the rest are decoded one by one.
    seconds = (s.inference_end_ms - s.first_token_ms) / s.SCALING_FACTOR_UNITS_PER_SECOND
    return reply, s.num_prompt_tokens, phone.rate(s.num_generated_tokens, seconds)
