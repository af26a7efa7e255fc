"""`edgetune train` settings: defaults, help text and validation in one frozen dataclass."""

from dataclasses import dataclass

from edgetune.config import given_field, option
from edgetune.constants import BATCH_SIZE, GRAD_ACCUM
from edgetune.errors import EdgetuneError
from edgetune.methods import IA3_TARGETS, NAMES, method
from edgetune.units import parse_size

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class TrainConfig:
    config: str | None = option(None, "YAML file of these options; flags given here override it",
                                positional=True, metavar="CONFIG.yaml")
    model: str = option(DEFAULT_MODEL, "model: built-in name, local HF folder, .gguf file or hub id")
    data: str | None = option(None, "training data, JSONL (alpaca, chat messages or text records)")
    eval_data: str | None = option(None, "validation data, JSONL; default: split off --eval-split")
    eval_split: float = option(0.05, "fraction of --data held out for validation when no --eval-data")
    template: str | None = option(None, "chat template for chat and alpaca records: chatml, gemma, "
                                  "llama3, plain or a FILE.jinja (default: the model's own; a base "
                                  "model without one gets one chosen from its vocabulary)",
                                  metavar="NAME|FILE")
    output: str = option("edgetune-run", "run folder: PEFT adapter, config, log and checkpoints")
    force: bool = option(False, "replace an existing run folder (only one edgetune made, or an "
                                "empty one)")
    resume: bool = option(False, "continue the run in --output from its last checkpoint, with its "
                                 "recorded settings; flags given here change only what they name")
    seq_len: int = option(512, "longest sequence in tokens; longer examples are truncated")
    batch_size: int = option(BATCH_SIZE, "examples per micro-batch")
    grad_accum: int = option(GRAD_ACCUM, "micro-batches per optimizer step")
    steps: int | None = option(None, "optimizer steps (default: --epochs over the data)")
    epochs: float = option(1.0, "passes over the data when --steps is not given")
    lr: float = option(2e-4, "peak learning rate")
    warmup: float = option(0.05, "share of the steps spent warming the learning rate up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    method: str = option("lora", "adapter method: lora, dora, rslora, adalora, ia3, prompt, ptuning "
                         "or prefix (docs/methods.md compares them)", choices=NAMES)
    rank: int = option(16, "LoRA rank (AdaLoRA: the average rank it prunes to)")
    alpha: float = option(32.0, "LoRA alpha (scale = alpha / rank; rsLoRA: alpha / sqrt(rank))")
    dropout: float = option(0.0, "LoRA dropout")
    init_rank: int | None = option(None, "adalora: the rank every module starts from before pruning "
                                   "(default: 1.5 x --rank)")
    virtual_tokens: int = option(20, "prompt, ptuning, prefix: virtual tokens prepended to every input")
    target_modules: str | None = option(None, "comma-separated module names to adapt, or all-linear "
                                        "(default: all-linear; ia3: k_proj,v_proj,down_proj)")
    dtype: str = option("auto", "compute dtype; auto: bf16 where the CPU or GPU has it, else fp32",
                        choices=("auto", "fp32", "bf16"))
    quant: str = option("none", "base weights: none (compute dtype), int8 or nf4 (QLoRA)",
                        choices=("none", "int8", "nf4"))
    double_quant: bool = option(True, "nf4 only: quantize the block scales too")
    optim: str = option("adamw", "optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass, and "
                                            "unmap freed blocks of 1 MiB or more: less memory, slower")
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=("auto", "cpu", "cuda"))
    threads: int | None = option(None, "CPU threads for torch, per process (default: the cores "
                                 "divided among the processes on this machine)")
    nproc: int | None = option(None, "data-parallel processes on this machine, started through "
                               "torch.distributed's launcher (gloo on CPU, NCCL on CUDA); the global "
                               "batch is --nproc x --grad-accum x --batch-size (default: 1)")
    dist_timeout: int = option(600, "seconds a process waits for the others (to start, at each "
                               "step) before the run ends with an error")
    seed: int = option(0, "seed for LoRA init, data order and the split")
    save_every: int = option(50, "write a checkpoint every N optimizer steps (0: only at the end)")
    eval_every: int = option(50, "evaluate every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep (0: all)")
    ram: str | None = option(None, "memory budget, e.g. 8gb: stop cleanly before RSS would pass it "
                              "(the processes of --nproc share it)")
    plan: str | None = option(None, "auto: choose quant, rank, batch and checkpointing for --ram",
                              choices=("auto",))
    cache_dir: str | None = option(None, "where GGUF models are cached as HF checkpoints "
                                   "(default: $EDGETUNE_CACHE or ~/.cache/edgetune)")
    progress: bool = option(True, "show a progress bar")
    given: frozenset[str] | None = given_field()

    def __post_init__(self) -> None:
        if self.data is None and not self.resume:
            raise EdgetuneError("no training data: pass --data FILE.jsonl (or data: in the YAML)")
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "rank": self.rank,
                    "threads": 1 if self.threads is None else self.threads,
                    "nproc": 1 if self.nproc is None else self.nproc,
                    "dist_timeout": self.dist_timeout, "virtual_tokens": self.virtual_tokens}
        if self.init_rank is not None:
            positive["init_rank"] = self.init_rank
        for name, value in positive.items():
            if value < 1:
                raise EdgetuneError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        counts = {"save_every": self.save_every, "eval_every": self.eval_every,
                  "keep_checkpoints": self.keep_checkpoints}
        for name, value in counts.items():
            if value < 0:
                raise EdgetuneError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        self._check_values()
        if self.steps is not None and self.steps < 1:
            raise EdgetuneError(f"--steps must be at least 1, got {self.steps}")
        if not 0 <= self.eval_split < 1:
            raise EdgetuneError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        if not 0 <= self.warmup < 1:
            raise EdgetuneError(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.lr <= 0 or self.epochs <= 0:
            raise EdgetuneError("--lr and --epochs must be positive")
        if self.plan == "auto" and self.ram is None:
            raise EdgetuneError("--plan auto needs a budget: pass --ram, e.g. --ram 8gb")
        if self.resume and self.force:
            raise EdgetuneError("--resume continues a run and --force replaces it: pass only one")
        self._check_method()

    def _check_method(self) -> None:
        chosen = method(self.method)
        if self.init_rank is not None and chosen.name != "adalora":
            raise EdgetuneError(f"--init-rank is AdaLoRA's; --method {chosen.name} does not use it")
        if chosen.name == "adalora" and self.adalora_init_rank < self.rank:
            raise EdgetuneError(f"--init-rank {self.init_rank} is below --rank {self.rank}: AdaLoRA "
                                "prunes from the initial rank down to --rank on average")
        if self.target_modules is not None and not chosen.ranked and chosen.name != "ia3":
            raise EdgetuneError(f"--target-modules does not apply to --method {chosen.name}: it adapts "
                                "no layer, it learns inputs")

    def _check_values(self) -> None:
        if not 0 <= self.dropout < 1:
            raise EdgetuneError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0 or self.weight_decay < 0:
            raise EdgetuneError("--alpha must be positive and --weight-decay 0 or more")
        if self.target_modules is not None and not self.modules:
            raise EdgetuneError("--target-modules names no module: pass all-linear or names such "
                                "as q_proj,v_proj")
        if self.ram is not None:
            try:
                parse_size(self.ram)
            except EdgetuneError as exc:
                raise EdgetuneError(f"--ram {self.ram}: {exc}") from None
        if not self.output:
            raise EdgetuneError("--output must name a folder")

    @property
    def adalora_init_rank(self) -> int:
        """AdaLoRA's initial rank: given, or half again the target rank."""
        return self.init_rank or max(self.rank, round(1.5 * self.rank))

    @property
    def modules(self) -> str | list[str] | None:
        """PEFT's target_modules: the string all-linear, a list of names, or None for soft prompts."""
        chosen = method(self.method)
        if self.target_modules is None:
            return list(IA3_TARGETS) if chosen.name == "ia3" else ("all-linear" if chosen.ranked else None)
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]
