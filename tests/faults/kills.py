"""Killing the controller at chosen moments of a run on the emulator: what to wait for, and how."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runner.store import Store

SETUP = "echo $$ >> /data/setup-starts; echo preparing; sleep 3; cat /banner > /data/prepared"
TRAIN = (
    "echo $$ >> /data/train-starts; echo training; sleep 4;"
    " { cat /data/prepared; wc -l < /data/setup-starts; wc -l < /data/train-starts; } > /out/result"
)
EXPECTED = "emulated\n1\n1\n"  # the banner set-up copied, one set-up start, one trainer start

Seen = Callable[[Store, str, Path], bool]


def phase_started(name: str) -> Seen:
    return lambda store, run_id, run_dir: any(p.name == name for p in store.phases(run_id))


def event_seen(kind: str) -> Seen:
    return lambda store, run_id, run_dir: any(e.kind == kind for e in store.events(run_id))


def log_has(log: str, text: str) -> Seen:
    def seen(store: Store, run_id: str, run_dir: Path) -> bool:
        path = run_dir / "logs" / log
        return path.is_file() and text in path.read_text(errors="replace")

    return seen


KILL_POINTS = {
    "planning": phase_started("plan"),
    "instance-acquired-booting": event_seen("instance.acquired"),
    "stage-begins": phase_started("stage"),
    "setup-step-running": log_has("setup-01-prepare.log", "preparing"),
    "boot-gpu-begins": phase_started("boot_gpu"),
    "off-between-boots": event_seen("instance.powered_off"),
    "train-begins": phase_started("train"),
    "trainer-running": log_has("train.log", "training"),
    "collect-begins": phase_started("collect"),
    "teardown-begins": phase_started("teardown"),
}


def wait_for(env: dict, out: Path, seen: Seen, alive: Callable[[], bool], timeout: float = 300) -> str:
    """Poll the run being made under out until seen(...) holds; its id. Fails if the run's
    process ends first (alive() turns False) or the moment never comes."""
    home = Path(env["RUNNER_HOME"])
    deadline = time.monotonic() + timeout
    while True:
        assert alive(), "the run ended before the moment came"
        assert time.monotonic() < deadline, "the moment never came"
        run_dirs = list(out.glob("*/")) if out.is_dir() else []
        if run_dirs and (home / "state.db").exists():
            with Store(home) as store:
                run_id = run_dirs[0].name
                if any(r.id == run_id for r in store.list_runs(5)) and seen(store, run_id, run_dirs[0]):
                    return run_id
        time.sleep(0.1)


def submit_until(
    env: dict, spec: Path, seen: Seen, timeout: float = 300, signum: int = signal.SIGKILL
) -> str:
    """Start `runner submit`, send it signum (SIGKILL) once seen(...) holds and wait for its
    end; return the run's id."""
    out = spec.parent / "runs"
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--out", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return wait_for(env, out, seen, lambda: proc.poll() is None, timeout)
    finally:
        proc.send_signal(signum)
        proc.wait(timeout=300)
        proc.stderr.close()


def submit_acting(env: dict, spec: Path, seen: Seen, act: Callable[[], object]) -> tuple[int, dict, str]:
    """`runner submit --json`; once seen(...) holds, act() (inject a fault) while it goes on;
    the run's exit code, JSON answer and stderr."""
    out = spec.parent / "runs"
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--json", "--out", str(out)]
    done: dict = {}

    def run() -> None:
        done["proc"] = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(env, out, seen, thread.is_alive)
        act()
    finally:
        thread.join(timeout=900)
    proc = done["proc"]
    return proc.returncode, json.loads(proc.stdout), proc.stderr
