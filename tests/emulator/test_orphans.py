"""Instances left billing with no runner process behind them: every command warns, with the
price; `runner down --orphans` and `runner down RUN` power them off (the trainer is stopped
with SIGTERM first, so its checkpoint survives and `runner resume` brings it home)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import intervals, runner, tiny_job
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
