"""One controller per run: the process that drives a run holds its lock until it ends.

A second `runner resume` while the first still runs (or a resume during the original submit)
would start a second trainer or boot the instance twice; the lock makes it refuse instead.
The lock is an flock on a file under RUNNER_HOME, so the kernel releases it when its holder
dies in any way (SIGKILL included): a run whose lock is free has no controller, and
`runner resume` may take it over.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import BadInput
from runner.home import private_dir, runner_home


class RunBusy(BadInput):
    """Another runner process drives this run right now."""


def _lock_path(run_id: str) -> Path:
    return private_dir(runner_home() / "locks") / f"{run_id}.lock"


@contextmanager
def hold(run_id: str) -> Iterator[None]:
    """Hold the run's lock for the duration, or raise RunBusy naming the process that has it."""
    fd = os.open(_lock_path(run_id), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusy(
                f"run {run_id} is driven by another runner process (pid {holder});"
                f" `runner logs {run_id} -f` follows it, or wait for it to end"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int, attempts: int = 3) -> bool:
    """Take the lock, trying again briefly: `holder` (runner status) holds it for an instant."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.05)
    return False


def holder(run_id: str) -> int | None:
    """The pid of the process that drives the run now, or None when none does."""
    path = runner_home() / "locks" / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
