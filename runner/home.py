"""Where runner keeps its state, and how that folder is protected.

One environment variable (RUNNER_HOME) moves everything, so tests and users with several
setups never share state by accident. The folder holds host keys and run records: it is
private to the user (0700 folders, 0600 files).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "RUNNER_HOME"


def runner_home() -> Path:
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir("runner", appauthor=False))


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed and make it readable by the owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Create an empty file with mode 0600 if missing, and tighten its mode if it exists.

    An existing file is never opened here: closing any descriptor of a file drops every POSIX
    lock this process holds on it, such as SQLite's on the state database."""
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    path.chmod(0o600)
    return path
