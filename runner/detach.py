"""`runner submit --detach`: the run goes on in a background runner process, the terminal is free.

The spec is validated here first, so a bad spec still fails at once with exit code 2. The
background process is an ordinary `runner submit` started in a session of its own: it has no
terminal, so closing this one sends it no SIGHUP, and it drives the run exactly as a foreground
one would (the run's lock names it: `runner status` shows its pid). Its output goes to
$RUNNER_HOME/detached/<run-id>.log; `runner logs RUN -f` follows the run's own logs. If it dies
(the laptop reboots), `runner resume RUN` continues the run from its first unfinished phase.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from runner.errors import NotFound, RunFailed
from runner.home import private_dir, runner_home
from runner.images import require_pinned_id
from runner.spec import load_spec
from runner.store import open_store

START_TIMEOUT_S = 60.0


def start(job: Path, out_dir: Path, *, accept_new_host_key: bool, run_id_for) -> dict:
    """Start the run of job in the background; what `submit --detach` reports (run_id, run_dir,
    pid, log) once the run is recorded. run_id_for(job name) makes the run's ID."""
    loaded = load_spec(job)
    require_pinned_id(loaded)  # refused here, in the foreground, like a bad spec
    run_id = run_id_for(loaded.spec.name)
    log = private_dir(runner_home() / "detached") / f"{run_id}.log"
    argv = [
        sys.executable,
        "-m",
        "runner",
        "submit",
        str(loaded.path),
        "--out",
        str(out_dir),
        "--run-id",
        run_id,
    ]
    if accept_new_host_key:
        argv.append("--accept-new-host-key")
    with log.open("ab") as output:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            env=os.environ,
        )
    _wait_recorded(run_id, process, log)
    return {"run_id": run_id, "run_dir": str(out_dir.resolve() / run_id), "pid": process.pid, "log": str(log)}


def _recorded(run_id: str) -> bool:
    with open_store() as store:
        try:
            store.get_run(run_id)
        except NotFound:
            return False
    return True


def _wait_recorded(run_id: str, process: subprocess.Popen, log: Path) -> None:
    """Return once the background process has recorded the run; raise with its last words if it
    ended before (a provider that cannot be reached, a taken run folder)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _recorded(run_id):
            return
        if process.poll() is not None:
            last = [
                line
                for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip()
            ]
            raise RunFailed(
                f"the background run ended at once: {last[-1] if last else f'exit code {process.returncode}'}"
            )
        time.sleep(0.2)
    raise RunFailed(f"the background run did not start within {START_TIMEOUT_S:.0f}s (log: {log})")
