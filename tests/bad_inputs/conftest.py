"""Bad input, as a user gives it: each case runs the real command in a subprocess and must end
with exit code 2 (3 for what a remote host or provider sent), one line naming the problem, and
no change to what existed before: the state database's rows, the runs folder, the artifacts."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.store import Run, open_store
from tests.remote.conftest import images, root_key, sshd_host, sshd_image, start_host  # noqa: F401 (fixtures)

REPO = Path(__file__).parents[2]


@dataclass
class Workspace:
    """A job folder, a runs folder holding an earlier run's artifact, and a state folder that
    knows that run."""

    folder: Path
    home: Path
    runs: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RUNNER_HOME": str(self.home),
            "RUNNER_CONFIG": str(self.folder / "config.toml"),
            "PYTHONPATH": str(REPO),
        }

    def runner(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runner", *args],
            cwd=self.folder, env=self.env(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def python(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.folder,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def snapshot(self) -> tuple[list[str], dict[str, str]]:
        """The database's rows and every file under the runs folder with its sha256."""
        with sqlite3.connect(self.home / "state.db") as db:
            rows = list(db.iterdump())
        files = {
            str(p.relative_to(self.runs)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.runs.rglob("*"))
            if p.is_file()
        }
        return rows, files


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    space = Workspace(tmp_path / "job", tmp_path / "home", tmp_path / "runs")
    space.folder.mkdir()
    earlier = space.runs / "earlier-20261201-000000-abcdef"
    (earlier / "artifacts").mkdir(parents=True)
    (earlier / "artifacts" / "lora.safetensors").write_bytes(os.urandom(4096))
    with open_store(space.home) as store:
        store.create_run(
            Run(
                id=earlier.name, job_name="earlier", spec_path=str(space.folder / "old.yaml"),
                spec_sha256="0" * 64, provider="local", run_dir=str(earlier), status="succeeded",
                created_at=time.time() - 3600, ended_at=time.time() - 3000, exit_code=0,
            )
        )  # fmt: skip
    return space


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single `error: ...` line a refused input must produce (and nothing on stdout)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr[-2000:]
    assert proc.stdout == "", proc.stdout[-2000:]
    return lines[0]
