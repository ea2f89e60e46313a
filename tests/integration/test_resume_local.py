"""`runner resume` on the local provider: the controller SIGKILLed while a step's container
runs; the resumed run reattaches to that container (never starts a second one), a second
`runner resume` at the same time is refused, and the run ends as if nothing happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import quick_job, run_cli

pytestmark = pytest.mark.integration

COUNTED = "echo $$ >> /data/{name}-starts; echo {name} started; sleep {seconds}"


def start(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RUNNER_HOME": str(home)}
    argv = [sys.executable, "-m", "runner", *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_running(client, run_id: str, step: str, timeout: float = 120) -> None:
    labels = [f"dev.runner.run-id={run_id}", f"dev.runner.step={step}"]
    deadline = time.monotonic() + timeout
    while not client.containers.list(filters={"label": labels, "status": "running"}):
        assert time.monotonic() < deadline, f"no running {step} container within {timeout}s"
        time.sleep(0.2)


def killed_during(home: Path, spec: Path, out: Path, client, step: str) -> str:
    """Submit, SIGKILL the controller once the step's container runs; the run's id."""
    proc = start(home, "submit", str(spec), "--out", str(out))
    try:
        run_id = proc.stderr.readline().split()[1]  # "run <id> -> <folder>"
        wait_running(client, run_id, step)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    return run_id


@pytest.mark.parametrize("step", ["setup:count", "train"])
def test_resume_after_sigkill_reattaches_to_the_running_step(image_id, tmp_path, docker_engine, step):
    setup = COUNTED.format(name="setup", seconds=4 if step == "setup:count" else 0)
    train = COUNTED.format(name="train", seconds=6 if step == "train" else 0)
    train += "; cat /data/setup-starts /data/train-starts | wc -l > /out/starts"
    spec = quick_job(tmp_path, image_id, train=train, outputs=["/out/starts"])
    spec.write_text(spec.read_text() + f"setup:\n  - name: count\n    run: {json.dumps(setup)}\n")
    home, out = tmp_path / "home", tmp_path / "runs"
    run_id = killed_during(home, spec, out, docker_engine, step)

    status = run_cli(home, "status", run_id)
    assert status.code == 0 and "no runner process drives this run any more" in status.stdout

    resumed = start(home, "resume", run_id, "--json")
    try:
        while "reattached to" not in (line := resumed.stderr.readline()):
            assert line, "the resumed run never reattached"
        second = run_cli(home, "resume", run_id)
        assert second.code == 2, second.stderr
        assert f"run {run_id} is driven by another runner process (pid {resumed.pid})" in second.stderr
        stdout, stderr = resumed.communicate(timeout=300)
    finally:
        resumed.kill()
    assert resumed.returncode == 0, stderr[-3000:]
    payload = json.loads(stdout)
    run_dir = Path(payload["run_dir"])
    assert (run_dir / "artifacts" / "starts").read_text().strip() == "2"  # each step started once
    log_name, name = ("setup-01-count.log", "setup") if step == "setup:count" else ("train.log", "train")
    assert (run_dir / "logs" / log_name).read_text().count(f"{name} started") == 1  # shown once
    assert docker_engine.containers.list(all=True, filters={"label": f"dev.runner.run-id={run_id}"}) == []
    phases = [(p["name"], p["status"]) for p in payload["phases"]]
    assert ("plan", "succeeded") in phases and not [p for p in phases if p[1] == "running"]
