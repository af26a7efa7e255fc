"""`edgetune plan` settings: defaults, help text and validation in one frozen dataclass."""

from dataclasses import dataclass

from edgetune.config import option
from edgetune.constants import BATCH_SIZE, GRAD_ACCUM
from edgetune.errors import EdgetuneError
from edgetune.methods import NAMES
from edgetune.units import parse_size

SIZE_HELP = "binary units: 8gb, 8GB, 8G and 8GiB all mean 8 x 2**30 bytes"


@dataclass(frozen=True)
class PlanConfig:
    config: str | None = option(None, "YAML file of these options; flags given here override it",
                                positional=True, metavar="CONFIG.yaml")
    model: str | None = option(None, "catalogue name, local HF folder (reads config.json only) or "
                               ".gguf file (reads its header only); omit to rate the whole catalogue")
    ram: str | None = option(None, f"RAM budget for training on the CPU, e.g. 8gb ({SIZE_HELP})")
    vram: str | None = option(None, f"GPU memory budget with --device cuda, e.g. 6gb ({SIZE_HELP})")
    device: str = option("cpu", "where training will run", choices=("cpu", "cuda"))
    seq_len: int | None = option(None, "sequence length in tokens (default: from --data, else 512)")
    data: str | None = option(None, "training JSONL: measure its token lengths to choose --seq-len "
                              "and estimate steps and time")
    batch: int = option(BATCH_SIZE * GRAD_ACCUM, "effective batch (micro-batch x gradient "
                        "accumulation) to reach; the default is `edgetune train`'s")
    epochs: float = option(1.0, "passes over --data, for the time estimate")
    method: str = option("lora", "adapter method to plan for (see edgetune train --method)",
                         choices=NAMES)
    virtual_tokens: int = option(20, "prompt, ptuning, prefix: virtual tokens per example")
    rank: int | None = option(None, "fix the LoRA rank instead of searching 64, 32, 16, 8, 4")
    dtype: str = option("auto", "compute dtype; auto: bf16 where the CPU or GPU has it, else fp32",
                        choices=("auto", "bf16", "fp32"))
    calibrate: bool = option(False, "time this machine's matmul speed (a few seconds, cached) "
                             "for the tokens/s estimate")
    target: str | None = option(None, "device profile the model will run on after export "
                                "(see `edgetune devices`)")
    nproc: int = option(1, "data-parallel processes on this machine (edgetune train --nproc): "
                        "the budget is shared among them, --batch is their global batch, and the "
                        "speed counts the all-reduce of the adapter's gradients")
    json: bool = option(False, "print the plan as JSON")

    def __post_init__(self) -> None:
        if self.ram is None and self.vram is None:
            raise EdgetuneError("no budget: pass --ram 8gb (CPU) or --vram 6gb --device cuda (GPU)")
        if self.vram is not None and self.device != "cuda":
            raise EdgetuneError("--vram is a GPU budget: pass --device cuda with it, or use --ram")
        if self.device == "cuda" and self.vram is None:
            raise EdgetuneError("--device cuda plans for GPU memory: pass --vram, e.g. --vram 6gb")
        if self.budget_bytes <= 0:
            raise EdgetuneError(f"{self.budget_flag} must be more than zero")
        for name in ("seq_len", "batch", "rank", "nproc", "virtual_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EdgetuneError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.epochs <= 0:
            raise EdgetuneError(f"--epochs must be positive, got {self.epochs}")

    @property
    def budget_flag(self) -> str:
        return "--vram" if self.device == "cuda" else "--ram"

    @property
    def budget_text(self) -> str:
        return str(self.vram if self.device == "cuda" else self.ram)

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.budget_text)
