"""Where the code of a run came from: the git checkout runner runs from, and the one the job's
spec lies in. A run made from uncommitted changes says so (dirty, with a hash of the diff), so
"which code gave this adapter?" has an answer even when the answer is "a working tree".
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

GIT_TIMEOUT_S = 20


def checkout_of(path: Path) -> dict | None:
    """The git checkout holding path: its commit, whether it has changes (untracked files
    count), and the sha256 of `git diff HEAD`; None outside a checkout or without git."""
    folder = path if path.is_dir() else path.parent
    if shutil.which("git") is None:
        return None
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(folder, "status", "--porcelain") or ""
    diff = _git(folder, "diff", "HEAD", "--binary", text=False) or b""
    return {
        "commit": commit.strip(),
        "dirty": bool(status.strip()),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
    }


def _git(folder: Path, *args: str, text: bool = True):
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=text, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None
