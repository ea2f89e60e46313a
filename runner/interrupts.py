"""How the controller treats Ctrl-C, SIGTERM and SIGHUP (the terminal closed).

A run survives the laptop: an interrupt ends the controller, never the work on the host, and
teardown still runs. Two moments must not be split by an interrupt: teardown itself, and the
start of a remote step, which either has not happened or has happened *and been recorded*, so
`runner stop`, `logs -f` and `resume` can find the step again.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def raised_as_keyboard_interrupt() -> Iterator[None]:
    """Treat SIGTERM and SIGHUP like Ctrl-C, so the pipeline's teardown runs for them too."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with _handled((signal.SIGTERM, signal.SIGHUP), interrupt):
        yield


@contextmanager
def ignored() -> Iterator[None]:
    """Let teardown finish: a second Ctrl-C must not leave containers or instances behind."""
    with _handled(_SIGNALS, signal.SIG_IGN):
        yield


@contextmanager
def deferred(doing: str) -> Iterator[None]:
    """Hold an interrupt that arrives while `doing` until it is done, then raise it."""
    received: list[int] = []

    def remember(signum: int, frame: object) -> None:
        if not received:
            print(f"runner: interrupted; finishing {doing} first", file=sys.stderr, flush=True)
        received.append(signum)

    with _handled(_SIGNALS, remember):
        yield
    if received:
        raise KeyboardInterrupt(signal.Signals(received[0]).name)


@contextmanager
def _handled(signals: tuple[signal.Signals, ...], handler: object) -> Iterator[None]:
    """Install handler for signals while the block runs (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
