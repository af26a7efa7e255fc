"""Each --method as a PEFT config, and the little the one training loop does differently for some.

`Hooks` is what the loop calls around an optimizer step; it does nothing for most methods. AdaLoRA
needs three things PEFT leaves to the training loop: its orthogonal regularisation (PEFT adds it in
its own forward, which the trainer's loss does not go through), `update_and_allocate` after every
optimizer step (importance scores from the gradients, then the rank budget), and, for an exact
resume, its allocator's running scores and rank pattern in each checkpoint.
"""

import contextlib
from typing import Any, Iterator

import torch

from edgetune.methods import IA3_FEEDFORWARD, method

# AdaLoRA's schedule as shares of the run: a warm-up before any pruning, and a final stretch that
# trains the pruned ranks (PEFT's documentation example: 10 and 20 of 100 steps).
ADALORA_WARMUP = 0.1
ADALORA_FINAL = 0.2


def adalora_schedule(total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps for a run of `total_steps`."""
    return int(ADALORA_WARMUP * total_steps), int(ADALORA_FINAL * total_steps)


def peft_config(config: Any, total_steps: int) -> Any:
    """PEFT's config for `config.method` (a TrainConfig) on a run of `total_steps` optimizer steps."""
    import peft

    name = method(config.method).name
    common = {"task_type": "CAUSAL_LM"}
    if name in ("lora", "dora", "rslora"):
        return peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=config.modules, bias="none", use_dora=name == "dora",
                               use_rslora=name == "rslora", **common)
    if name == "adalora":
        tinit, tfinal = adalora_schedule(total_steps)
        return peft.AdaLoraConfig(init_r=config.adalora_init_rank, target_r=config.rank,
                                  lora_alpha=config.alpha, lora_dropout=config.dropout,
                                  target_modules=config.modules, total_step=total_steps, tinit=tinit,
                                  tfinal=tfinal, deltaT=1, **common)
    if name == "ia3":
        modules = config.modules
        feedforward = [m for m in IA3_FEEDFORWARD if modules == "all-linear" or m in modules]
        return peft.IA3Config(target_modules=modules, feedforward_modules=feedforward, **common)
    n = config.virtual_tokens
    if name == "prompt":  # started from real token embeddings: random vectors learn far slower
        return peft.PromptTuningConfig(num_virtual_tokens=n, **common,
                                       prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    if name == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=n, encoder_reparameterization_type="MLP",
                                        **common)
    return peft.PrefixTuningConfig(num_virtual_tokens=n, **common)


class Hooks:
    """What the loop does for a method beyond forward, backward and the optimizer step: by default
    nothing."""

    packs = True  # whether batches may be packed rows

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the step's loss once per optimizer step, or None."""
        return None

    def after_step(self, step: int) -> None:
        """Called after the optimizer step numbered `step` (from 1), before the gradients are cleared."""

    def state(self) -> dict:
        """What a checkpoint must hold, beyond the adapter weights, to resume exactly."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore `state()` after the adapter weights were loaded."""

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """Around writing a checkpoint's adapter."""
        yield


class PrefixHooks(Hooks):
    packs = False  # see edgetune.train.prompts


class PromptEncoderHooks(Hooks):
    """P-tuning: PEFT saves the encoder's output (the virtual token embeddings), not the encoder, so
    a checkpoint carries the encoder's own weights to train on from where it stopped."""

    def __init__(self, model: Any) -> None:
        self.encoder = model.prompt_encoder[model.active_adapter]

    def state(self) -> dict:
        return {"tensors": {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}}

    def load_state(self, state: dict) -> None:
        self.encoder.load_state_dict(state["tensors"])


class AdaLoraHooks(Hooks):
    """AdaLoRA's regulariser, rank allocation and allocator state (see the module docstring)."""

    _SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model: Any) -> None:
        self.tuner = model.base_model  # peft's AdaLoraModel
        self.config = self.tuner.peft_config[self.tuner.trainable_adapter_name]

    def extra_loss(self) -> torch.Tensor | None:
        """PEFT's orthogonal regularisation: mean Frobenius distance of A A^T and B^T B from I."""
        if self.config.orth_reg_weight == 0:
            return None
        name = self.tuner.trainable_adapter_name
        terms = []
        for n, p in self.tuner.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and name in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype)))
        return self.config.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def after_step(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def state(self) -> dict:
        allocator = self.tuner.rankallocator
        tensors = {f"{kind}:{n}": t for kind in self._SCORES for n, t in getattr(allocator, kind).items()}
        return {"rank_pattern": self.config.rank_pattern, "tensors": tensors}

    def load_state(self, state: dict) -> None:
        allocator = self.tuner.rankallocator
        allocator.reset_ipt()
        for key, tensor in state["tensors"].items():
            kind, name = key.split(":", 1)
            getattr(allocator, kind)[name] = tensor
        self.config.rank_pattern = state["rank_pattern"]

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """Checkpoints keep every rank: with a rank pattern set, PEFT would save the pruned shapes,
        which cannot be loaded back into the full-rank layers the optimizer holds. The pattern itself
        is in `state()`."""
        pattern, self.config.rank_pattern = self.config.rank_pattern, None
        try:
            yield
        finally:
            self.config.rank_pattern = pattern


def hooks(model: Any, name: str | None) -> Hooks:
    """The loop hooks for `model` trained with --method `name`."""
    chosen = method(name).name
    if chosen == "adalora":
        return AdaLoraHooks(model)
    if chosen == "ptuning":
        return PromptEncoderHooks(model)
    return PrefixHooks() if chosen == "prefix" else Hooks()
