"""The training loop: one optimizer step at a time, with eval, checkpoints, logging and a memory guard."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgetune import folders, signals
from edgetune.constants import IGNORE
from edgetune.errors import EdgetuneError
from edgetune.runfiles import TRAIN_LOG
from edgetune.signals import deferred
from edgetune.train import checkpoint, curves
from edgetune.train.adapters import Hooks
from edgetune.train.data import Batches, Example, collate, n_tokens, pack
from edgetune.train.distributed import PeerLost, World
from edgetune.train.heap import MemoryGuard, peak_rss, rss
from edgetune.train.loss import causal_lm_loss


@dataclass
class Summary:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    peak_rss_bytes: int
    interrupted: bool = False
    stopped_for_memory: bool = False
    history: list = field(default_factory=list)
    exit_status: int = 0  # 128 + the signal that interrupted the run (130 Ctrl-C, 143 SIGTERM)


class Loop:
    """State of one run: model, optimizer, schedule, data position and step."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, batches: Batches,
                 eval_examples: list[Example], run_dir: Path, config: Any, total_steps: int,
                 guard: MemoryGuard | None, objective: Callable = causal_lm_loss,
                 world: World | None = None, hooks: Hooks | None = None):
        self.objective = objective  # (model, batch) -> (sum of token losses, tokens)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.hooks = hooks or Hooks()  # what the method adds to a step (edgetune.train.adapters)
        self.batches, self.eval_examples, self.run_dir = batches, eval_examples, run_dir
        self.config, self.total_steps, self.guard = config, total_steps, guard
        self.world = world or World()
        self.memory_message = ""
        self.step = self.saved_step = 0
        self.device = next(p.device for p in model.parameters())
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.history: list[dict] = []
        if batches.packed:
            from edgetune.train.attention import use_segment_attention

            use_segment_attention(model)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, tokens seen)."""
        loss, tokens = self.backward()
        self.update()
        return loss, tokens

    def backward(self) -> tuple[float, int]:
        """Forward and backward passes of one step: the part a signal may cut short.

        The step reads ranks x grad_accum micro-batches, the global batch; each rank computes the
        passes of its contiguous share, and the gradients (each divided by the step's label count)
        are summed over the ranks, so the update is the one a single process would make.
        """
        accum, world = self.config.grad_accum, self.world
        micro = [self.batches.next() for _ in range(accum * world.size)]
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        total = 0.0
        self.model.train()
        for batch in micro[world.rank * accum:(world.rank + 1) * accum]:
            loss_sum, _ = self.objective(self.model, to_device(batch, self.device))
            (loss_sum / n_labels).backward()
            total += loss_sum.item()
        extra = self.hooks.extra_loss()  # once per step, as PEFT's forward adds it to the loss
        if extra is not None and world.main:  # on one rank: the ranks' gradients are summed
            extra.backward()
        total = world.sum_gradients(self.trainable, total)
        return total / n_labels, sum(n_tokens(b) for b in micro)

    def update(self) -> None:
        """Apply the gradients: clip, optimizer and schedule, the method's after-step, step count."""
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.hooks.after_step(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def evaluate(self) -> float | None:
        """Mean token loss over the validation set."""
        if not self.eval_examples:
            return None
        self.model.eval()
        loss = mean_token_loss(self.model, self.eval_examples, self.config.batch_size,
                               self.batches.pad_id, self.batches.packed, self.device)
        self.model.train()
        return loss

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "data": self.batches.state(), "history": self.history,
                "micro_batches": self.world.size * self.config.grad_accum,
                "method": self.hooks.state()}

    def restore(self, path: Path) -> None:
        state = checkpoint.load(path, self.model)
        self._load(state)
        checkpoint.set_rng_state(state["rng"])

    def share(self) -> None:
        """Give every rank rank 0's adapter, optimizer state, schedule, data position and step."""
        if self.world.size == 1:
            return
        state = self.world.share({**self.state(), "step": self.step} if self.world.main else None)
        self.world.share_tensors(self.trainable)
        if not self.world.main:
            self._load(state)

    def _load(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state(state["data"])
        self.history = state.get("history", [])
        self.step = self.saved_step = state["step"]
        self.hooks.load_state(state.get("method", {}))

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; the other ranks only take note)."""
        self.saved_step = self.step
        if not self.world.main:
            return None
        state = self.state()  # before the hooks change what the adapter saves
        with self.hooks.checkpointing():
            path = checkpoint.save(self.run_dir, self.step, self.model, state,
                                   self.config.keep_checkpoints)
        curves.update(self.run_dir, title=self.config.output)
        return path

    def log(self, record: dict) -> None:
        self.history.append(record)
        log_file = self.run_dir / TRAIN_LOG
        with folders.disk_errors(self.run_dir), log_file.open("a") as stream:
            stream.write(json.dumps(record) + "\n")

    def run(self, on_step: Callable[[int], None] | None = None,
            after_step: Callable[[], None] | None = None) -> Summary:
        """Train to `total_steps`; a signal (Ctrl-C, SIGTERM) or the memory guard ends early with a
        checkpoint.

        `on_step(step)` is called before each step, `after_step()` after it. Only the forward and
        backward passes are cut short by a signal (the step then did not happen); from the update to
        the checkpoint a step completes as one piece (see signals.deferred).
        """
        self.bar = _progress(self.config.progress and self.world.main, self.total_steps, self.step)
        self.tokens, self.seconds = 0, 0.0
        last_loss, eval_loss = None, None
        stop: KeyboardInterrupt | None = None
        lost: PeerLost | None = None
        stopped = False
        try:
            while self.step < self.total_steps:
                position = self.batches.state()
                try:
                    if on_step is not None:
                        on_step(self.step)
                    started = time.perf_counter()
                    last_loss, n_tokens = self.backward()
                except (KeyboardInterrupt, PeerLost):
                    self.batches.load_state(position)  # the step did not happen
                    self.optimizer.zero_grad(set_to_none=True)
                    raise
                with deferred():
                    eval_loss, stopped = self._complete(last_loss, n_tokens, started, eval_loss,
                                                        after_step)
                if stopped:
                    break
        except KeyboardInterrupt as exc:  # held during a step, raised once it was complete
            stop = exc
        except PeerLost as exc:  # another rank died: keep what this one holds, then end
            lost = exc
        finally:
            self.bar.close()
        if (stop is not None or stopped or lost is not None) and self.step > self.saved_step:
            self.save_checkpoint()
        if lost is not None:
            raise EdgetuneError(f"another process of the run stopped ({lost}); the last checkpoint "
                                f"is step {self.saved_step}: continue with edgetune train --resume "
                                f"--output {self.config.output}")
        return Summary(self.step, last_loss, eval_loss,
                       self.tokens / self.seconds if self.seconds else 0.0, peak_rss(),
                       stop is not None, stopped, self.history,
                       signals.exit_status(stop) if stop is not None else 0)

    def _complete(self, loss: float, n_tokens: int, started: float, eval_loss: float | None,
                  after_step: Callable[[], None] | None) -> tuple[float | None, bool]:
        """Update, log, guard and checkpoint: the part of a step a signal does not cut short.
        Returns the latest eval loss and whether the memory guard stopped the run."""
        self.update()
        if after_step is not None:
            after_step()
        elapsed = time.perf_counter() - started
        self.tokens, self.seconds = self.tokens + n_tokens, self.seconds + elapsed
        if self.world.main:
            eval_loss = self._record(loss, n_tokens, elapsed, eval_loss, self.tokens / self.seconds)
        stopped = self._near_budget()
        if not stopped and _due(self.step, self.config.save_every, self.total_steps):
            self.save_checkpoint()
        return eval_loss, stopped

    def _near_budget(self) -> bool:
        """The memory guard of each process, agreed on by all: one near its budget stops them all."""
        if self.guard is None:
            return False
        mine = self.guard.should_stop()
        # After the last step there is nothing left to stop: the run ends with its adapter.
        if self.step >= self.total_steps or not self.world.any(mine):
            return False
        self.memory_message = self.guard.message if mine else (
            "another process of the run came within a step of its --ram budget")
        return True

    def _record(self, loss: float, n_tokens: int, elapsed: float, eval_loss: float | None,
                speed: float) -> float | None:
        """Log the step just taken (evaluating when due); returns the latest eval loss."""
        record = {"step": self.step, "loss": round(loss, 6), "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(n_tokens / elapsed, 1), "rss_mb": round(rss() / 2**20)}
        if _due(self.step, self.config.eval_every, self.total_steps) and self.eval_examples:
            eval_loss = record["eval_loss"] = self.evaluate()
        self.log(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}",
                             rss=f"{rss() / 2**30:.2f}G", refresh=False)
        return eval_loss


def to_device(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def mean_token_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int,
                    packed: bool, device: Any) -> float:
    """Mean loss per label token over `examples`, packed or padded `batch_size` at a time."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = pack(chunk) if packed else collate(chunk, pad_id)
        loss_sum, n = causal_lm_loss(model, to_device(batch, device))
        total, count = total + loss_sum.item(), count + n
    return total / max(count, 1)


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _progress(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train")
