"""Faults on the laptop's side of a run: the state database held by another process, the run's
folder deleted under a running run (also just before the instance is preempted), a second
runner process acting on the same run. Each run
still ends correctly, with its artifacts whole and no GPU time past the watchdog's bound."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner import pipeline
from runner.console import Reporter
from runner.store import DB_NAME, Store
from tests.emulator.cloud import runner, tiny_job
from tests.faults.checks import (
    assert_artifacts_intact,
    assert_gpu_time_bounded,
    assert_store_consistent,
    assert_whole_run,
)
from tests.faults.kills import SETUP, TRAIN, log_has, submit_acting, wait_for
from tests.faults.test_preemption import TRAIN as CHECKPOINTING_TRAIN
from tests.faults.test_preemption import power_off_from_outside
from tests.unit.test_store import hold_write_lock

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_a_state_database_locked_for_a_while_mid_training_only_delays_the_run(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "db-locked", TRAIN, setup=SETUP)
    held: list[subprocess.Popen] = []
    try:
        code, payload, stderr = submit_acting(
            cloud,
            spec,
            log_has("train.log", "training"),
            lambda: held.append(hold_write_lock(Path(cloud["RUNNER_HOME"]) / DB_NAME, 8)),
        )
    finally:
        for holder in held:
            holder.wait()
    assert_whole_run(cloud, code, payload, stderr)


def test_a_submit_facing_a_database_locked_past_the_wait_fails_in_one_line(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "db-locked-long", TRAIN, setup=SETUP)
    home = Path(cloud["RUNNER_HOME"])
    with Store(home) as store:
        before = [run.id for run in store.list_runs(1000)]
    holder = hold_write_lock(home / DB_NAME, 60)
    try:
        env = {**cloud, "RUNNER_STATE_WAIT_S": "2"}
        done = runner(env, "submit", str(spec), "--out", str(tmp_path / "runs"))
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: the state database is locked by another process (waited 2s)")
    assert "Traceback" not in done.stderr
    with Store(home) as store:
        assert [run.id for run in store.list_runs(1000)] == before  # nothing half recorded
    assert not (tmp_path / "runs").is_dir() or not list((tmp_path / "runs").iterdir())


def test_the_run_folder_deleted_mid_training_is_made_again_and_the_artifacts_land(
    cloud, tmp_path, tiny_image
):
    spec = tiny_job(tmp_path, tiny_image, "folder-deleted", TRAIN, setup=SETUP)
    runs = tmp_path / "runs"
    code, payload, stderr = submit_acting(
        cloud, spec, log_has("train.log", "training"), lambda: [shutil.rmtree(d) for d in runs.iterdir()]
    )
    assert "was deleted while the run went on: made it again" in stderr
    assert_whole_run(cloud, code, payload, stderr)
    assert json.loads((Path(payload["run_dir"]) / "manifest.json").read_text())["status"] == "succeeded"


def test_the_run_folder_deleted_then_the_instance_preempted_still_lands_the_artifacts(
    cloud, tmp_path, tiny_image
):
    """The trainer followed again on a new boot opens its log again, in a folder that is gone."""
    spec = tiny_job(tmp_path, tiny_image, "deleted-preempted", CHECKPOINTING_TRAIN, setup=SETUP)
    runs = tmp_path / "runs"

    def preempt_and_delete() -> None:
        power_off_from_outside(cloud, runs)
        for folder in runs.iterdir():
            shutil.rmtree(folder)

    code, payload, stderr = submit_acting(cloud, spec, log_has("train.log", "step 2"), preempt_and_delete)
    assert code == 0, stderr[-4000:]
    assert "was powered off from outside (preempted?)" in stderr
    assert "was deleted while the run went on: made it again" in stderr
    assert_artifacts_intact(payload)
    assert_gpu_time_bounded(cloud, payload["run_id"])
    assert_store_consistent(cloud, payload["run_id"])
    result = (Path(payload["run_dir"]) / "artifacts" / "result").read_text().splitlines()
    assert result[:3] == ["emulated", "1", "2"]  # trained twice, the second time from its checkpoint


class DeletingAfterCollect(Reporter):
    """Deletes the run folder the moment collect is done, before teardown lets the host go."""

    def __init__(self, runs: Path) -> None:
        super().__init__(quiet=True)
        self.runs = runs

    def phase(self, name: str, status: str, detail: str = "") -> None:
        super().phase(name, status, detail)
        if (name, status) == ("collect", "done"):
            for folder in self.runs.iterdir():
                shutil.rmtree(folder)


def test_outputs_deleted_at_home_after_collect_are_collected_again_before_teardown(
    tmp_path, tiny_image, monkeypatch
):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    spec = tmp_path / "local.yaml"
    spec.write_text(
        f"name: deleted-after-collect\nprovider: {{type: local}}\nimage: {{ref: '{tiny_image}'}}\n"
        "train: {gpus: 0, run: 'cat /banner > /out/result'}\noutputs: [/out/result]\n",
        encoding="utf-8",
    )
    runs = tmp_path / "runs"
    result = pipeline.submit(spec, runs, DeletingAfterCollect(runs))
    assert result.run.status == "succeeded"
    (artifact,) = result.artifacts
    assert (Path(result.run.run_dir) / artifact.path).read_text() == "emulated\n"
    assert_artifacts_intact({"run_dir": result.run.run_dir, "artifacts": [vars(artifact)]})


def test_a_second_resume_while_the_first_drives_the_run_is_refused_and_the_first_finishes(
    cloud, tmp_path, tiny_image
):
    spec = tiny_job(tmp_path, tiny_image, "two-resumes", TRAIN, setup=SETUP)
    runs = tmp_path / "runs"
    killed = subprocess.Popen(
        [sys.executable, "-m", "runner", "submit", str(spec), "--out", str(runs)],
        env=cloud,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_id = wait_for(
        cloud, runs, log_has("setup-01-prepare.log", "preparing"), lambda: killed.poll() is None
    )
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    first = subprocess.Popen(
        [sys.executable, "-m", "runner", "resume", run_id, "--json"],
        env=cloud,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(cloud, runs, lambda store, rid, folder: _driven(cloud, rid), lambda: first.poll() is None)
        second = runner(cloud, "resume", run_id)
        assert second.returncode == 2
        assert f"run {run_id} is driven by another runner process (pid {first.pid})" in second.stderr
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert_whole_run(cloud, first.returncode, json.loads(out), err)


def _driven(env: dict, run_id: str) -> bool:
    status = runner(env, "status", run_id, "--json")
    return status.returncode == 0 and json.loads(status.stdout)["driven_by_pid"] is not None
