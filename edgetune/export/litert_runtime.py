"""A .litertlm bundle in its runtimes: its TFLite program in LiteRT's CompiledModel (logits step by
step and through prefill), and the whole bundle in LiteRT-LM's Conversation API (a chat reply).

The program is read out of the bundle itself, so what is checked is what ships. The KV cache buffers
are bound as both input and output of each call, as LiteRT-LM binds them, so decoding one token does
not copy the cache.
"""

from pathlib import Path

from edgetune.export import phone

DECODE = "decode"


def run(path: Path, ids: list[int], chat: phone.Chat | None) -> phone.Run:
    """Step-by-step and prefill logits of the bundle's program over `ids`, and its chat reply."""
    import numpy as np

    program = Program(tflite_bytes(path))
    steps = np.stack([program.decode(token, i) for i, token in enumerate(ids[:-1])])
    split = min(phone.prefill_split(len(ids)), program.prefill_length)
    program.prefill(ids[:split])
    end = min(split + phone.DECODE_AFTER_PREFILL, len(ids) - 1)
    # The prefill signature returns no logits (the runtime samples from decode): what it wrote into
    # the cache is checked by the decode steps that read it.
    prefilled = np.stack([program.decode(ids[i], i) for i in range(split, end)])
    reply, prompt_tokens, speed = converse(path, chat) if chat else ("", None, None)
    return phone.Run(steps, prefilled, split, reply, prompt_tokens, speed)


def tflite_bytes(path: Path) -> bytes:
    """The prefill/decode TFLite program stored in a .litertlm bundle."""
    import io

    from litert_lm_builder import litertlm_peek

    header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
    with open(path, "rb") as f:
        for i in range(header.SectionMetadata().ObjectsLength()):
            section = header.SectionMetadata().Objects(i)
            if litertlm_peek.get_model_type(section) == "tf_lite_prefill_decode":
                f.seek(section.BeginOffset())
                return f.read(section.EndOffset() - section.BeginOffset())
    raise RuntimeError(f"{path} holds no prefill/decode TFLite program")


class Program:
    """The bundle's program with its KV cache, in LiteRT's CompiledModel on the CPU."""

    def __init__(self, tflite: bytes):
        import numpy as np
        from ai_edge_litert.compiled_model import CompiledModel

        self.model = CompiledModel.from_buffer(tflite)
        signatures = self.model.get_signature_list()
        self.prefill_name = next(s for s in signatures if s.startswith("prefill"))
        inputs = self.model.get_input_tensor_details(DECODE)
        self.length = int(inputs["mask"]["shape"][-1])
        self.vocab = int(self.model.get_output_tensor_details(DECODE)["logits"]["shape"][-1])
        self.prefill_length = int(self.model.get_input_tensor_details(self.prefill_name)["tokens"]
                                  ["shape"][-1])
        self.cache = {name: self.model.create_input_buffer_by_name(DECODE, name)
                      for name in inputs if name.startswith("kv_cache")}
        for name, buffer in self.cache.items():
            buffer.write(np.zeros(inputs[name]["shape"], inputs[name]["dtype"]))
        self.buffers = {s: {n: self.model.create_input_buffer_by_name(s, n)
                            for n in ("tokens", "input_pos", "mask")} for s in (DECODE, self.prefill_name)}
        self.logits = self.model.create_output_buffer_by_name(DECODE, "logits")

    def _run(self, signature: str, tokens, positions, mask) -> None:
        import numpy as np

        buffers = self.buffers[signature]
        buffers["tokens"].write(np.asarray([tokens], np.int32))
        buffers["input_pos"].write(np.asarray(positions, np.int32))
        buffers["mask"].write(mask)
        outputs = dict(self.cache)
        if signature == DECODE:
            outputs["logits"] = self.logits
        self.model.run_by_name(signature, buffers | self.cache, outputs)

    def decode(self, token: int, position: int):
        """Logits (numpy [vocab]) after `token` at `position`, reading and extending the cache."""
        import numpy as np

        self._run(DECODE, [token], [position], causal_mask([position], self.length))
        return self.logits.read(self.vocab, np.float32)

    def prefill(self, ids: list[int]) -> None:
        """Write `ids` (positions 0..) into the cache in one call, padded to the signature's length:
        the padding lands in later cache slots, which decoding overwrites before attending to them."""
        n = self.prefill_length
        positions = list(range(n))
        self._run(self.prefill_name, list(ids) + [0] * (n - len(ids)), positions,
                  causal_mask(positions, self.length))


def causal_mask(positions: list[int], length: int):
    """Additive mask [1, 1, tokens, length]: token at position p sees cache slots 0..p."""
    import numpy as np

    mask = np.full((1, 1, len(positions), length), np.finfo(np.float32).min, np.float32)
    for row, p in enumerate(positions):
        mask[0, 0, row, : p + 1] = 0
    return mask


def converse(path: Path, chat: phone.Chat) -> tuple[str, int | None, float | None]:
    """(reply, prompt tokens, decode tokens/s) from LiteRT-LM's Conversation API, greedy."""
    import tempfile

    import litert_lm

    # The engine caches XNNPACK's packed weights beside the model unless told where: not in the export.
    with tempfile.TemporaryDirectory(prefix="edgetune-litert-") as cache:
        engine = litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(), enable_benchmark=True,
                                  cache_dir=cache)
        return _converse(engine, chat)


def _converse(engine, chat: phone.Chat) -> tuple[str, int | None, float | None]:
    import litert_lm

    try:
        conversation = engine.create_conversation(
            sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0),
            max_output_tokens=phone.CHAT_TOKENS)
        message = conversation.send_message(chat.messages[-1])
        reply = "".join(part.get("text", "") for part in message.contents.to_json()
                        if part.get("type") == "text")
        info = conversation.get_benchmark_info()
        conversation.close()
    finally:
        engine.close()
    speed = info.last_decode_tokens_per_second if info.last_decode_token_count > 1 else None
    return reply.strip(), info.last_prefill_token_count or None, speed
