"""What every fault scenario must leave behind, checked the same way each time."""

from __future__ import annotations

import hashlib
from pathlib import Path

from runner.store import Store
from tests.emulator.cloud import intervals

WATCHDOG_BOUND_S = 60  # a GPU boot may outlive training by this much (poll + grace + power-off)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_artifacts_intact(payload: dict) -> None:
    """Every artifact the run reports is on disk with the sha256 it reports."""
    run_dir = Path(payload["run_dir"])
    for artifact in payload["artifacts"]:
        assert sha256(run_dir / artifact["path"]) == artifact["sha256"], artifact


def assert_store_consistent(env: dict, run_id: str) -> None:
    """No phase left running, every billed interval closed."""
    with Store(Path(env["RUNNER_HOME"])) as store:
        assert not [p.name for p in store.phases(run_id) if p.status == "running"]
        run = store.get_run(run_id)
        assert run.status in ("succeeded", "failed", "interrupted") and run.ended_at is not None


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
    assert overrun <= WATCHDOG_BOUND_S, overrun
    return overrun
