"""A local AutoDL-style cloud for rehearsing a job before paying, and for testing the provider.

`runner emulator up` starts it detached: an HTTP server speaking the AutoDL API subset of
docs/providers.md, whose instances are Docker containers with sshd (see docs/emulator.md).
Its folder is `$RUNNER_HOME/emulator/` (0700): the token (never printed), `server.json`
(URL and pid of the running server), `state.json` (instances, power log) and a log.
Other code finds a running emulator with `connection()`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from runner.errors import BadInput
from runner.home import runner_home

NOT_RUNNING = "no emulator is running; start one with runner emulator up"


def emulator_home() -> Path:
    """The emulator's state folder under RUNNER_HOME (not created here)."""
    return runner_home() / "emulator"


def server_info(home: Path | None = None) -> dict | None:
    """`server.json` of a live emulator server (url, pid, port), or None when none is running."""
    path = (home or emulator_home()) / "server.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def connection(home: Path | None = None) -> tuple[str, str]:
    """(base URL, token) of the running emulator; BadInput when none is running."""
    home = home or emulator_home()
    info = server_info(home)
    token_file = home / "token"
    if info is None or not token_file.exists():
        raise BadInput(NOT_RUNNING)
    return str(info["url"]), token_file.read_text(encoding="utf-8").strip()
