"""Stopping a runner: SIGTERM (kill, a job scheduler) ends a job exactly as Ctrl-C does."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so one cleanup path serves both:
    temp files removed, finished work kept. The command line exits 143 for it (130 for Ctrl-C)."""

    exit_code = 128 + signal.SIGTERM


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return interrupt.exit_code if isinstance(interrupt, Terminated) else 128 + signal.SIGINT


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated in the main thread (elsewhere signals are left alone)."""
    def stop(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
