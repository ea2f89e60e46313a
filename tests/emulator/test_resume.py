"""`runner resume` of a run whose trainer went down with the instance, and what resume refuses.
(The controller killed at each phase boundary: tests/faults/test_controller_killed.py.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import intervals, runner, tiny_job
from tests.faults.kills import SETUP, TRAIN, log_has, submit_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


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
