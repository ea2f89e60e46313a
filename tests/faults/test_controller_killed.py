"""`runner resume` after the controller was SIGKILLed at each phase boundary and inside set-up,
the switch between boots and training: the run finishes, every step ran exactly once (its
outputs count its starts), the artifacts are whole, the instance was booted once with its GPU
(between a no-GPU boot for set-up and one for collecting), no GPU time outlived training by
more than the watchdog's bound, and the store is consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import intervals, runner, tiny_job
from tests.faults.checks import assert_artifacts_intact, assert_gpu_time_bounded, assert_store_consistent
from tests.faults.conftest import chosen
from tests.faults.kills import EXPECTED, KILL_POINTS, SETUP, TRAIN, submit_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
FAST = {"setup-step-running", "trainer-running", "collect-begins"}


@pytest.mark.parametrize("point", chosen(KILL_POINTS, FAST))
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
    assert_artifacts_intact(payload)

    log = intervals(cloud, run_id)
    # set-up, training, collect: the GPU boot once, nothing billed twice
    assert [i["mode"] for i in log] == ["non_gpu", "gpu", "non_gpu"], log
    assert_gpu_time_bounded(cloud, run_id)
    assert_store_consistent(cloud, run_id)
    with Store(Path(cloud["RUNNER_HOME"])) as store:
        assert [e.data["at"] for e in store.events(run_id) if e.kind == "run.resumed"]
