"""What every fault scenario must leave behind, checked the same way each time.

With RUNNER_FAULTS_RECORD set to a file, each check also appends what it measured there as a
JSON line (artifacts checked and lost, GPU-mode overrun), before it asserts: the figures
bench/reliability.py reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from runner.store import Store
from tests.emulator.cloud import intervals
from tests.faults.kills import EXPECTED

WATCHDOG_BOUND_S = 60  # a GPU boot may outlive training by this much (poll + grace + power-off)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


RECORD_ENV = "RUNNER_FAULTS_RECORD"


def record(**figures: object) -> None:
    """Append figures, named after the running test, to $RUNNER_FAULTS_RECORD if set."""
    path = os.environ.get(RECORD_ENV)
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": test, **figures}) + "\n")


def assert_artifacts_intact(payload: dict) -> None:
    """Every artifact the run reports is on disk with the sha256 it reports."""
    run_dir = Path(payload["run_dir"])
    lost = [
        a["path"]
        for a in payload["artifacts"]
        if not (run_dir / a["path"]).is_file() or sha256(run_dir / a["path"]) != a["sha256"]
    ]
    record(artifacts=len(payload["artifacts"]), artifacts_lost=len(lost))
    assert not lost, lost


def assert_store_consistent(env: dict, run_id: str) -> None:
    """No phase left running, every billed interval closed."""
    with Store(Path(env["RUNNER_HOME"])) as store:
        assert not [p.name for p in store.phases(run_id) if p.status == "running"]
        run = store.get_run(run_id)
        assert run.status in ("succeeded", "failed", "interrupted") and run.ended_at is not None


def wait_powered_off(env: dict, run_id: str, timeout: float = 2 * WATCHDOG_BOUND_S) -> None:
    """Wait until every power-on interval of the run's instance has ended: after a run that
    failed mid-training without its API, the watchdog powers off when the trainer ends."""
    deadline = time.monotonic() + timeout
    while any(i["ended_at"] is None for i in intervals(env, run_id)) and time.monotonic() < deadline:
        time.sleep(1)


def assert_gpu_time_bounded(env: dict, run_id: str) -> float:
    """Each GPU-mode interval of the run's instance ended, and none outlived the train phases
    (all attempts) by more than the watchdog's bound; the largest overrun in seconds."""
    with Store(Path(env["RUNNER_HOME"])) as store:
        trained = [p for p in store.phases(run_id) if p.name == "train" and p.ended_at is not None]
    last_train_end = max(p.ended_at for p in trained) if trained else 0.0
    overrun = 0.0
    for interval in intervals(env, run_id):
        assert interval["ended_at"] is not None, interval
        if interval["mode"] == "gpu":
            overrun = max(overrun, interval["ended_at"] - last_train_end)
    record(gpu_overrun_s=round(overrun, 1))
    assert overrun <= WATCHDOG_BOUND_S, overrun
    return overrun


def assert_whole_run(env: dict, code: int, payload: dict, stderr: str) -> None:
    """The run succeeded with the expected result, every artifact whole, GPU time bounded and
    the store consistent."""
    assert code == 0, stderr[-4000:]
    assert (Path(payload["run_dir"]) / "artifacts" / "result").read_text() == EXPECTED
    assert_artifacts_intact(payload)
    assert_gpu_time_bounded(env, payload["run_id"])
    assert_store_consistent(env, payload["run_id"])
