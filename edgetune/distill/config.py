"""`edgetune distill` settings: `edgetune train`'s, plus the teacher and how to learn from it."""

from dataclasses import dataclass

from edgetune.config import option
from edgetune.errors import EdgetuneError
from edgetune.train.config import DEFAULT_MODEL, TrainConfig

MODES = ("logits", "sequences")
KD_LOSSES = ("kl", "jsd")  # edgetune.train.kd

@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    model: str = option(DEFAULT_MODEL, "student model: built-in name, local HF folder, .gguf file or "
                        "hub id; it must share the teacher's tokenizer", flag="student")
    data: str | None = option(None, "prompts, JSONL (alpaca or chat records; answers may be missing, "
                              "the teacher writes them)")
    output: str = option("edgetune-distill", "run folder: PEFT adapter, config, log and checkpoints")
    teacher: str | None = option(None, "teacher: a .gguf file or a built-in model name, run in "
                                 "llama.cpp through llama-cpp-python")
    mode: str = option("logits", "logits: learn the teacher's top-k distribution at every response "
                       "token; sequences: learn the teacher's responses", choices=MODES)
    top_k: int = option(64, "teacher log-probabilities kept per response token (logits mode)")
    kd_loss: str = option("kl", "distillation loss against the renormalised top-k: forward KL or "
                          "JSD", choices=KD_LOSSES, flag="loss")
    ce_weight: float = option(0.5, "weight of cross-entropy on the response tokens, added to the "
                              "distillation loss (logits mode)")
    max_new_tokens: int = option(256, "longest response the teacher writes for a prompt without one")
    temperature: float = option(0.0, "the teacher's sampling temperature for responses (0: greedy)")
    top_p: float = option(1.0, "the teacher's nucleus sampling for responses (1: off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher is None and not self.resume:
            raise EdgetuneError("no teacher: pass --teacher MODEL.gguf (or a built-in model name)")
        if self.top_k < 1:
            raise EdgetuneError(f"--top-k must be at least 1, got {self.top_k}")
        if self.ce_weight < 0 or self.temperature < 0:
            raise EdgetuneError("--ce-weight and --temperature must be 0 or more")
        if not 0 < self.top_p <= 1:
            raise EdgetuneError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise EdgetuneError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")

    def sampling(self) -> dict:
        """The settings the teacher writes responses with, recorded beside them."""
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}
