"""Phone-native files: what the ExecuTorch (.pte) and LiteRT-LM (.litertlm) exporters share.

Both runtimes come with the optional extra `edgetune[phone]` and are imported only when one of their
formats is asked for; a missing one is a one-line error naming what to install. Both files hold a
static KV cache of --ctx positions: the context is fixed when the file is written.

Each file is verified in its runtime's own Python API on the held-out ids the other formats see:
- step by step: one token at a time from an empty cache, as a phone decodes. These logits go through
  the shared comparison with torch (verify.compare) and its gate.
- prefill: the first ids in one call, then a few decode steps from the cache it wrote. They must give
  the step-by-step logits again (KL divergence within float noise), or the file's prompt path
  computes something its decode path does not.
- chat: one question through the runtime's own generation API (ExecuTorch's TextLLMRunner,
  LiteRT-LM's Conversation) with the tokenizer, chat template and stop tokens the file carries. The
  prompt must have as many tokens as torch's (a doubled start token or a wrong template shows here)
  and an fp32 file must give torch's greedy reply; the reply's decode speed is the row's tokens/s.
"""

import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgetune import hf
from edgetune.errors import EdgetuneError
from edgetune.export.report import Verification

EXTRA = 'pip install "edgetune[phone]"'
# format -> (runtime, the modules its exporter and verification import)
RUNTIMES = {"executorch": ("ExecuTorch", ("executorch", "torchao")),
            "litert": ("LiteRT-LM", ("litert_torch", "ai_edge_litert", "litert_lm"))}
# model_type -> HF class: the architectures round-tripped through both runtimes (tests/test_phone.py).
SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CHAT_QUESTION = "What is the capital of France?"
CHAT_TOKENS = 32
PREFILL_TOKENS = 64  # prompt length of the prefill check (at most half the held-out ids)
DECODE_AFTER_PREFILL = 8
# Mean KL divergence (nats) between the prefill path and step-by-step decoding of the same file: both
# run the same weights, so anything above float and dynamic-quantization noise is a wrong cache write.
PREFILL_MAX_KLD = 1e-3


def missing(fmt: str) -> str | None:
    """Why `fmt` cannot be written here (its runtime is not installed), or None."""
    runtime, modules = RUNTIMES[fmt]
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return f"needs {runtime} ({', '.join(absent)} not installed): {EXTRA}"


def require(fmt: str) -> None:
    """Raise the one-line error when `fmt`'s runtime is not installed."""
    why = missing(fmt)
    if why:
        raise EdgetuneError(f"--{fmt} {why}")


def unavailable() -> dict[str, str]:
    """{format: why} for the phone formats this installation cannot write."""
    return {fmt: why for fmt in RUNTIMES if (why := missing(fmt))}


def read_config(model_dir: Path, fmt: str) -> dict:
    """config.json of the merged model, refusing architectures not round-tripped through `fmt`."""
    return hf.read_supported_config(model_dir, SUPPORTED, f"{RUNTIMES[fmt][0]} export")


def cache_length(config: dict, ctx: int, quiet: bool = False) -> int:
    """The KV cache length to build in: --ctx, or the model's own limit when that is shorter."""
    limit = config.get("max_position_embeddings") or ctx
    if ctx > limit and not quiet:
        print(f"edgetune: --ctx {ctx} is beyond the model's {limit} positions: "
              f"the phone files hold {limit}", flush=True)
    return min(ctx, limit)


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the chat template's end-of-turn token, then eos."""
    from edgetune.export.gguf_vocab import chat_stops

    return [tokenizer.convert_tokens_to_ids(t) for t in chat_stops(tokenizer)]


@dataclass(frozen=True)
class Chat:
    """One chat turn, rendered by the model's template, and torch's greedy reply to it."""

    messages: list
    prompt: str  # with the generation prompt, as the runtimes must see it
    prompt_tokens: int
    reply: str  # special tokens dropped, stripped
    stops: list[str]  # the tokens that end a reply
    stop_ids: list[int]


def chat_reference(model_dir: Path, tokenizer) -> Chat | None:
    """torch's greedy reply to CHAT_QUESTION through the chat template, up to CHAT_TOKENS tokens;
    None for a model without a chat template (nothing to render the question with)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.gguf_vocab import chat_stops

    if not tokenizer.chat_template:
        return None
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stops = stop_ids(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=CHAT_TOKENS, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[-1])
    reply = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    return Chat(messages, prompt, len(ids), reply, chat_stops(tokenizer), stops)


def reply_text(text: str, chat: Chat) -> str:
    """A runtime's printed reply without its statistics line and trailing stop token."""
    text = re.sub(r"PyTorchObserver \{.*\}\s*$", "", text, flags=re.S).strip()
    for stop in chat.stops:
        text = text.removesuffix(stop)
    return text.strip()


@contextlib.contextmanager
def native_output():
    """Keep what a runtime's C++ code prints (stdout and stderr) off the screen; yields a function
    that returns (stdout, stderr) as text."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)

        def read() -> tuple[str, str]:
            _flush_c_stdio()
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
            return texts[0], texts[1]
        try:
            yield read
        finally:
            _flush_c_stdio()  # C's stdout is block-buffered into a file: empty it before switching back
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@dataclass
class Run:
    """What one file computed in its runtime."""

    steps: "object"  # numpy [positions, vocab]: step-by-step logits from an empty cache
    prefilled: "object"  # numpy [n, vocab]: the same positions from `start` on, via the prefill path
    start: int
    reply: str
    prompt_tokens: int | None  # as the runtime counted them, when it says
    tokens_per_s: float | None  # of the reply, timed by the runtime


def prefill_split(n_ids: int) -> int:
    """How many held-out ids the prefill check sends in one call."""
    return max(1, min(PREFILL_TOKENS, n_ids // 2))


def kl_divergence(ref_logits, logits):
    """KL(ref || file) per position, nats, in float64 (numpy [positions])."""
    import numpy as np

    from edgetune.metrics import log_softmax

    ref, got = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(ref) * (ref - got)).sum(-1), 0.0)


def verification(file: str, fmt: str, kind: str, size: int, run: Run, reference, chat: Chat | None,
                 note: str = "") -> Verification:
    """The report row of one phone file: the shared comparison of its step-by-step logits with torch,
    then the prefill and chat checks, each of which can fail the file."""
    from edgetune.export.verify import compare

    # fp32 files meet the shared 16-bit gate; quantized ones are reported, as other sub-q8_0 types are
    # (their activations are quantized at run time too, which no shared gate is set for).
    gate = kind if kind == "fp32" else f"{fmt.split()[0]} {kind}"
    row = compare(file, fmt, gate, run.steps, reference, size, run.tokens_per_s, note)
    notes = [row.note] if row.note else []
    if not hasattr(row, "kld_mean"):  # until the shared comparison reports it
        notes.append(f"mean KLD {kl_divergence(reference.logits, run.steps).mean():.2e} nats")
    failures = []
    end = run.start + len(run.prefilled)
    prefill = float(kl_divergence(run.steps[run.start:end], run.prefilled).mean())
    notes.append(f"prefill then decode: KLD {prefill:.1e} to step by step")
    if not prefill <= PREFILL_MAX_KLD:
        failures.append(f"the prefill path differs from step-by-step decoding (mean KLD {prefill:.2e} "
                        f"> {PREFILL_MAX_KLD:g} nats)")
    failures += _chat_failures(kind, run, chat, notes)
    row.note = "; ".join(notes + failures)
    if failures:
        row.passed = False
        if hasattr(row, "failures"):
            row.failures.extend(failures)
    return row


def _chat_failures(kind: str, run: Run, chat: Chat | None, notes: list[str]) -> list[str]:
    """The chat check: notes the reply beside torch's; what fails the file."""
    if chat is None:
        notes.append("no chat template: the chat check was skipped")
        return []
    same = skeleton(run.reply) == skeleton(chat.reply)
    notes.append(f"chat: {_quote(run.reply)}" + (" (torch's reply)" if same else
                                                  f", torch: {_quote(chat.reply)}"))
    failures = []
    if run.prompt_tokens is not None and run.prompt_tokens != chat.prompt_tokens:
        failures.append(f"the runtime read the chat prompt as {run.prompt_tokens} tokens, torch as "
                        f"{chat.prompt_tokens}: the file's tokenizer or template differs")
    if kind == "fp32" and not same:
        failures.append("its greedy chat reply differs from torch's")
    return failures


def skeleton(text: str) -> str:
    """A reply's printable ASCII, spaces collapsed: what every runtime prints the same way. A runner
    that prints token by token drops bytes that end inside a UTF-8 character, and control
    characters, where a whole-reply decode keeps or replaces them."""
    kept = "".join(c for c in text if c.isspace() or (c.isascii() and c.isprintable()))
    return " ".join(kept.split())


def _flush_c_stdio() -> None:
    import ctypes

    ctypes.CDLL(None).fflush(None)


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


class Clock:
    """Wall and CPU seconds of an export's stages. On a machine other jobs share, CPU seconds are
    what the stage costs (about its wall time on an idle machine, for single-threaded work)."""

    def __init__(self):
        import time

        self.laps: list[tuple[str, float, float]] = []
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        import time

        wall, cpu = time.perf_counter(), time.process_time()
        self.laps.append((name, wall - self._wall, cpu - self._cpu))
        self._wall, self._cpu = wall, cpu

    def __str__(self) -> str:
        return ", ".join(f"{name} {wall:.0f} s ({cpu:.0f} s CPU)" for name, wall, cpu in self.laps)


def rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second, or None when there is too little to time."""
    return tokens / seconds if tokens > 1 and seconds > 0 and math.isfinite(seconds) else None
