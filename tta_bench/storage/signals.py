"""Stopping cleanly on signals. SIGTERM (sent by `timeout`, Slurm time limits and preemption,
`docker stop`, a dying sweep parent) raises KeyboardInterrupt, so the code that keeps finished
samples and saves a checkpoint on Ctrl-C runs on SIGTERM too; a step that must not be cut in half
(logging a finished result) holds both signals off."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP = (signal.SIGINT, signal.SIGTERM)
Handler = Callable[[int, Any], Any] | int


@contextmanager
def sigterm_as_interrupt(once: bool = False, extra: tuple[int, ...] = ()) -> Iterator[None]:
    """Within the block SIGTERM (and the `extra` signals, e.g. submitit's SIGUSR2) raises
    KeyboardInterrupt, as Ctrl-C does. `once`: only the first SIGINT/SIGTERM does, later ones are
    ignored, so a second signal cannot cut short the checkpoint the first one started. The previous
    handlers come back on exit. Outside the main thread (no handlers there) it changes nothing."""
    signals = (signal.SIGTERM, *extra, *((signal.SIGINT,) if once else ()))

    def stop(signum: int, frame: Any) -> None:
        if once:
            for s in signals:
                signal.signal(s, _ignore)
        raise KeyboardInterrupt

    with _handlers(dict.fromkeys(signals, stop)):
        yield


@contextmanager
def shielded() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored within the block: for short steps that must finish once
    begun (a signal that arrives meanwhile is dropped)."""
    with _handlers(dict.fromkeys(STOP, _ignore)):
        yield


def _ignore(signum: int, frame: Any) -> None:
    """Ignores a signal in Python, not with SIG_IGN: a signal that arrived just before the switch
    would then raise OSError("Signal N ignored due to race condition")."""


@contextmanager
def _handlers(handlers: dict[int, Handler]) -> Iterator[None]:
    saved: dict[int, Handler] = {}
    try:
        for signum, handler in handlers.items():
            saved[signum] = signal.signal(signum, handler) or signal.SIG_DFL
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def die_with_parent(parent: int | None) -> bool:
    """On Linux, have the kernel send this process SIGTERM when its parent dies (a sweep killed
    with SIGKILL must not leave its workers running). False if `parent` has died already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    return parent is None or os.getppid() == parent
