"""The laptop's clock stepped an hour ahead or back while the trainer runs (an NTP correction,
a clock set by hand): the run succeeds, and the ledger still bills what the emulator's power
log billed, mode by mode, with no interval ending before it starts and none overlapping."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import intervals, tiny_job
from tests.faults.checks import assert_artifacts_intact, assert_store_consistent, record
from tests.faults.conftest import chosen
from tests.faults.kills import EXPECTED, SETUP, TRAIN, log_has, submit_acting

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CLOCK = str(Path(__file__).with_name("clock"))
SHIFTS = {"an-hour-back": -3600.0, "an-hour-ahead": 3600.0}
TOLERANCE_S = 5.0  # the controller sees a power change at most a poll later than the provider


@pytest.mark.parametrize("jump", chosen(SHIFTS, {"an-hour-back"}))
def test_a_laptop_clock_jump_mid_training_leaves_the_ledger_true(cloud, tmp_path, tiny_image, jump):
    shift = tmp_path / "clock-shift"
    shift.write_text("0")
    env = {**cloud, "PYTHONPATH": CLOCK, "RUNNER_TEST_CLOCK_SHIFT_FILE": str(shift)}
    spec = tiny_job(tmp_path, tiny_image, f"clock-{jump}", TRAIN, setup=SETUP)
    code, payload, stderr = submit_acting(
        env, spec, log_has("train.log", "training"), lambda: shift.write_text(str(SHIFTS[jump]))
    )
    assert code == 0, stderr[-4000:]
    assert (Path(payload["run_dir"]) / "artifacts" / "result").read_text() == EXPECTED
    assert_artifacts_intact(payload)
    assert_store_consistent(cloud, payload["run_id"])

    with Store(Path(cloud["RUNNER_HOME"])) as store:
        ledger = store.ledger(payload["run_id"])
    power_log = intervals(cloud, payload["run_id"])
    assert [{"cpu": "non_gpu"}.get(i.mode, i.mode) for i in ledger] == [i["mode"] for i in power_log]
    for earlier, later in itertools.pairwise(ledger):
        assert earlier.ended_at <= later.started_at  # no overlap
    gaps = []
    for billed, truth in zip(ledger, power_log, strict=True):
        assert billed.ended_at >= billed.started_at
        gaps.append(abs(billed.ended_at - billed.started_at - truth["seconds"]))
    record(ledger_error_s=round(max(gaps), 1))
    assert max(gaps) <= TOLERANCE_S, (gaps, ledger, power_log)
