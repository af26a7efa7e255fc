"""Ctrl-C (SIGINT) and SIGTERM end a run the same way: at a safe point, with a checkpoint.

SIGTERM is what `timeout`, job schedulers and container runtimes send before they kill. Its default
action ends the process at once; here both signals raise `Interrupted` in the main thread, except
inside `deferred()` blocks (an optimizer update, a checkpoint write), where the signal is held until
the block ends, so no state is ever half-updated or half-written.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; `exit_status` is the shell's convention, 128 + the signal."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal for an `Interrupted`; 130 (SIGINT) for a plain KeyboardInterrupt."""
    return exc.exit_status if isinstance(exc, Interrupted) else 128 + signal.SIGINT


class _Handler:
    def __init__(self) -> None:
        self.depth = 0  # > 0 inside deferred()
        self.pending: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.depth:
            self.pending = self.pending or signum
        else:
            raise Interrupted(signum)


_handler: _Handler | None = None


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` (outside `deferred()` sections).

    Outside the main thread signals cannot be caught; the block then changes nothing.
    """
    global _handler
    if threading.current_thread() is not threading.main_thread() or _handler is not None:
        yield
        return
    _handler = _Handler()
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _handler = None


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block has finished; then act on the first one that came."""
    handler = _handler
    if handler is None:
        yield
        return
    handler.depth += 1
    try:
        yield
    finally:
        handler.depth -= 1
    if handler.depth == 0 and handler.pending is not None:
        signum, handler.pending = handler.pending, None
        raise Interrupted(signum)
