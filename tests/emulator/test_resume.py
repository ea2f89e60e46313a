"""`runner resume` after the controller was SIGKILLed at each phase boundary and inside set-up,
the switch between boots and training: the run finishes, every step ran exactly once (its
outputs count its starts), the artifacts are the same in every case, and the instance was
booted once with its GPU (between a no-GPU boot for set-up and one for collecting), and ends
powered off."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import intervals, runner, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

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


def submit_until(
    env: dict, spec: Path, seen: Seen, timeout: float = 300, signum: int = signal.SIGKILL
) -> str:
    """Start `runner submit`, send it signum (SIGKILL) once seen(...) holds and wait for its
    end; return the run's id."""
    out = spec.parent / "runs"
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--out", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    home = Path(env["RUNNER_HOME"])
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the kill point never came"
            run_dirs = list(out.glob("*/")) if out.is_dir() else []
            if run_dirs:
                with Store(home) as store:
                    run_id = run_dirs[0].name
                    if any(r.id == run_id for r in store.list_runs(5)) and seen(store, run_id, run_dirs[0]):
                        break
            time.sleep(0.1)
    finally:
        proc.send_signal(signum)
        proc.wait(timeout=300)
        proc.stderr.close()
    return run_id


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_sigkill_finishes_with_each_step_run_once(cloud, tmp_path, tiny_image, point):
    spec = tiny_job(tmp_path, tiny_image, f"killed-{point}"[:40], TRAIN, setup=SETUP)
    run_id = submit_until(cloud, spec, KILL_POINTS[point])

    status = runner(cloud, "status", run_id, "--json")
    assert json.loads(status.stdout)["driven_by_pid"] is None  # the killed process held nothing

    done = runner(cloud, "resume", run_id, "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads(done.stdout)
    assert payload["status"] == "succeeded"
    run_dir = Path(payload["run_dir"])
    assert (run_dir / "artifacts" / "result").read_text() == EXPECTED
    assert [a["path"] for a in payload["artifacts"]] == ["artifacts/result"]

    log = intervals(cloud, run_id)
    # set-up, training, collect: the GPU boot once, nothing billed twice
    assert [i["mode"] for i in log] == ["non_gpu", "gpu", "non_gpu"], log
    assert all(i["ended_at"] is not None for i in log)
    with Store(Path(cloud["RUNNER_HOME"])) as store:
        assert not [p for p in store.phases(run_id) if p.status == "running"]
        assert [e.data["at"] for e in store.events(run_id) if e.kind == "run.resumed"]


def test_a_trainer_lost_with_the_power_off_starts_again_on_resume(cloud, tmp_path, tiny_image):
    """SIGTERM mid-training: teardown powers the instance off, which ends the trainer without an
    exit code. The resume boots the GPU again, finds the step lost (not running: its supervisor's
    pid may have been reused after the reboot, its start time tells) and starts it anew."""
    spec = tiny_job(tmp_path, tiny_image, "lost-trainer", TRAIN, setup=SETUP)
    run_id = submit_until(cloud, spec, log_has("train.log", "training"), signum=signal.SIGTERM)

    done = runner(cloud, "resume", run_id, "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "train was lost with its host (no exit code); starting it again" in done.stderr
    run_dir = Path(json.loads(done.stdout)["run_dir"])
    assert (run_dir / "artifacts" / "result").read_text() == "emulated\n1\n2\n"  # set-up once, train twice
    log = intervals(cloud, run_id)
    assert [i["mode"] for i in log] == ["non_gpu", "gpu", "non_gpu", "gpu", "non_gpu"], log
    assert all(i["ended_at"] for i in log)


def test_resume_refuses_a_finished_run_and_a_changed_spec(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "resume-refusals", "echo ok > /out/result")
    done = runner(cloud, "submit", str(spec), "--json", "--out", str(tmp_path / "runs"), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run_id = json.loads(done.stdout)["run_id"]

    again = runner(cloud, "resume", run_id)
    assert again.returncode == 2 and f"run {run_id} already succeeded; nothing to resume" in again.stderr

    with Store(Path(cloud["RUNNER_HOME"])) as store:
        store.finish_run(run_id, "failed", 1, "pretend collect failed")
    spec.write_text(spec.read_text() + "# edited\n")
    changed = runner(cloud, "resume", run_id)
    assert changed.returncode == 2 and "changed since run" in changed.stderr, changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
