"""Instances left billing with no runner process behind them: every command warns, with the
price; `runner down --orphans` and `runner down RUN` power them off (the trainer is stopped
with SIGTERM first, so its checkpoint survives and `runner resume` brings it home)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import admin, intervals, runner, tiny_job
from tests.emulator.test_resume import log_has, submit_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TRAIN = "trap 'echo saved > /out/ckpt; exit 0' TERM; echo training; while :; do sleep 0.2; done"


def left_billing(cloud: dict, tmp_path: Path, tiny_image: str, name: str) -> str:
    spec = tiny_job(tmp_path, tiny_image, name, TRAIN)
    spec.write_text(spec.read_text().replace("[/out/result]", "[/out/ckpt]") + "watchdog: {stall_s: null}\n")
    return submit_until(cloud, spec, log_has("train.log", "training"))  # SIGKILL: nothing powers off


def test_an_orphan_is_reported_by_every_command_and_powered_off_on_request(cloud, tmp_path, tiny_image):
    run_id = left_billing(cloud, tmp_path, tiny_image, "orphan-all")
    listed = runner(cloud, "runs")
    assert listed.returncode == 0
    assert f"(run {run_id}) is running in gpu mode with no runner process driving it, billed 2.15 CNY/h" in (
        listed.stderr
    )
    down = runner(cloud, "down", "--orphans", timeout=300)
    assert down.returncode == 0 and "powered off 1 instance(s)" in down.stderr, down.stderr
    assert all(i["ended_at"] for i in intervals(cloud, run_id))
    with Store(Path(cloud["RUNNER_HOME"])) as store:
        assert not [i for i in store.open_intervals() if i.run_id == run_id]
    assert "no runner process driving it" not in runner(cloud, "runs").stderr


def test_down_run_stops_the_trainer_with_sigterm_then_resume_collects_its_checkpoint(
    cloud, tmp_path, tiny_image
):
    run_id = left_billing(cloud, tmp_path, tiny_image, "orphan-one")
    down = runner(cloud, "down", run_id, "--grace", "20", timeout=300)
    assert down.returncode == 0 and "powered off" in down.stderr, down.stderr
    assert all(i["ended_at"] for i in intervals(cloud, run_id))
    status = json.loads(runner(cloud, "status", run_id, "--json").stdout)
    assert status["status"] == "interrupted" and status["error"] == "stopped with runner down"

    resumed = runner(cloud, "resume", run_id, "--json", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (Path(json.loads(resumed.stdout)["run_dir"]) / "artifacts" / "ckpt").read_text() == "saved\n"


def test_an_instance_stopped_from_outside_is_reconciled_at_the_providers_stop_time(
    cloud, tmp_path, tiny_image
):
    """Powered off in the console while nothing drove its run: the next command closes the
    interval at the moment the provider says it stopped, not when the command happened to run."""
    run_id = left_billing(cloud, tmp_path, tiny_image, "orphan-outside")
    gpu = intervals(cloud, run_id)[-1]
    admin(cloud, "/api/v1/instance/power_off", {"instance_uuid": gpu["instance_uuid"]})
    deadline = time.monotonic() + 60
    while (stopped := intervals(cloud, run_id)[-1])["ended_at"] is None:
        assert time.monotonic() < deadline, "the emulator never stopped the instance"
        time.sleep(0.5)
    time.sleep(3)  # the command below comes later than the stop
    listed = runner(cloud, "runs")
    assert listed.returncode == 0 and "no runner process driving it" not in listed.stderr
    with Store(Path(cloud["RUNNER_HOME"])) as store:
        ours = [i for i in store.ledger(run_id) if i.mode == "gpu"]
    assert [(i.ended_at, i.source) for i in ours] == [
        (pytest.approx(stopped["ended_at"], abs=1e-3), "provider")
    ]
