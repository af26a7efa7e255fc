"""`edgetune devices` settings: list the device profiles, optionally with what fits each one."""

from dataclasses import dataclass

from edgetune.config import option
from edgetune.errors import EdgetuneError


@dataclass(frozen=True)
class DevicesConfig:
    config: str | None = option(None, "YAML file of these options; flags given here override it",
                                positional=True, metavar="CONFIG.yaml")
    show: str | None = option(None, "print one profile in full, with the source of every figure",
                              metavar="DEVICE")
    model: str | None = option(None, "also show, per device, the export that fits this model "
                               "(built-in name or local HF folder)")
    ctx: int = option(2048, "context length in tokens the KV cache must hold, with --model")
    cache_dir: str | None = option(None, "where built-in models are cached as HF checkpoints "
                                   "(default: $EDGETUNE_CACHE or ~/.cache/edgetune)")

    def __post_init__(self) -> None:
        if self.ctx < 1:
            raise EdgetuneError(f"--ctx must be at least 1, got {self.ctx}")
