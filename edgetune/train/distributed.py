"""Data parallelism on torch.distributed: the processes of one run, and what they exchange.

Every rank reads the same global batch (the micro-batches one process with gradient accumulation would
read, in the same order) and computes the forward and backward passes of its contiguous share; one
all-reduce per optimizer step then sums the LoRA gradients (already divided by the global count of
label tokens) together with the loss, so every rank applies the same update to the same adapter. Only
the adapter's gradients travel: the base weights are frozen. Rank 0 alone writes the run folder.

Processes are started by torch.distributed's launcher (`edgetune train --nproc N`, or `torchrun` across
machines), which sets RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; gloo carries the tensors on CPUs, NCCL
on CUDA GPUs. Every collective has a timeout (--dist-timeout), and a failed one (a rank that died)
raises `PeerLost`, so no rank waits for ever.
"""

import contextlib
import datetime
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.folders import say

# Settings each rank may hold its own value of; every other one must be the same on all ranks.
PER_RANK = {"threads", "progress", "cache_dir", "given"}


class PeerLost(Exception):
    """A collective failed: another process of the run stopped or cannot be reached."""


class Quiet(EdgetuneError):
    """A rank other than 0 stopping because rank 0 refused the run and said why."""

    def __init__(self) -> None:
        super().__init__("")


def launched() -> bool:
    """True in a process started by torchrun or `edgetune train --nproc`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of ranks, ranks on this machine."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_gradients(self, params: list, loss_sum: float) -> float:
        """Sum the gradients of `params` and the loss over the ranks, in one all-reduce.

        One flat buffer per step, not one call per tensor: a LoRA adapter is a few hundred small
        tensors, and each collective costs a round trip (docs/distributed.md has both measured).
        """
        if self.size == 1:
            return loss_sum
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [torch.tensor([loss_sum], dtype=grads[0].dtype, device=grads[0].device)])
        _collective(torch.distributed.all_reduce, flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
            offset += g.numel()
        return float(flat[-1])

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (the memory guard of one process stops them all)."""
        if self.size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self._device())
        _collective(torch.distributed.all_reduce, value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled: for small state, not for weights)."""
        if self.size == 1:
            return obj
        box = [_to_cpu(obj) if self.main else None]
        _collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def share_tensors(self, tensors: list) -> None:
        """Copy rank 0's values of `tensors` into every rank's, in place."""
        if self.size == 1:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            _collective(torch.distributed.broadcast, flat, src=0)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run `work` on rank 0 and hand its result to every rank; when rank 0 refuses (an
        EdgetuneError), it says why and the other ranks stop quietly."""
        if self.size == 1:
            return work()
        result, refused = None, None
        if self.main:
            try:
                result = work()
            except EdgetuneError as exc:
                refused = exc
        result, failed = self.share((result, refused is not None))
        if refused is not None:
            raise refused
        if failed:
            raise Quiet()
        return result

    def check_same(self, settings: dict) -> None:
        """Refuse (on rank 0, in one line) ranks started with settings different from rank 0's."""
        if self.size == 1:
            return
        mine = {k: v for k, v in settings.items() if k not in PER_RANK}
        everyone: list = [None] * self.size
        _collective(torch.distributed.all_gather_object, everyone, mine)
        for rank, theirs in enumerate(everyone):
            differ = sorted(k for k in set(mine) | set(theirs) if theirs.get(k) != everyone[0].get(k))
            if differ and self.main:
                name = differ[0]
                raise EdgetuneError(
                    f"rank {rank} was started with --{name.replace('_', '-')} "
                    f"{theirs.get(name)!r} and rank 0 with {everyone[0].get(name)!r}: every process "
                    f"of a run needs the same settings (only --threads and --progress may differ)")
            if differ:
                raise Quiet()

    def _device(self) -> Any:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"


def _collective(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (torch.distributed.DistError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PeerLost(first) from None


def _to_cpu(obj: Any) -> Any:
    """`obj` with its tensors on the CPU, so that a rank on another GPU can unpickle it."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def default_threads(local_size: int) -> int:
    """The cores of this machine shared among the processes running on it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local_size)


@contextlib.contextmanager
def joined(nproc: int | None, timeout_s: int, device: str) -> Iterator[World]:
    """Join the process group when this process was launched as one rank of a run, else yield a
    one-process World. Ranks other than 0 print nothing while training (rank 0 speaks for the run)."""
    if not launched():
        yield World()
        return
    world = _init(nproc, timeout_s, device)
    try:
        with contextlib.ExitStack() as quiet:
            if not world.main:  # errors still reach stderr: the CLI prints them after this block
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield world
        # A rank that ended normally waits for the others: the launcher stops every rank as soon as
        # one exits non-zero (a memory stop exits 3), which would cut rank 0's last writes short.
        _collective(torch.distributed.barrier)
    finally:
        torch.distributed.destroy_process_group()


def _init(nproc: int | None, timeout_s: int, device: str) -> World:
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if nproc is not None and nproc != local_size:
        raise EdgetuneError(f"--nproc {nproc}, but the launcher started {local_size} processes on "
                            f"this machine: leave --nproc out under torchrun")
    cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (torch.distributed.DistError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EdgetuneError(f"rank {rank} could not join the run at {where} within "
                            f"--dist-timeout {timeout_s}s ({first})") from None
    world = World(rank, size, local_size, backend)
    if world.main:
        machines = max(1, size // local_size)
        say(f"{size} processes on {machines} machine{'s' * (machines > 1)}; gradients all-reduced "
            f"by {backend} on {'CUDA' if cuda else 'the CPU'}")
    return world
