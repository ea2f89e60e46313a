"""The provider's API misbehaving during a run on the emulator: HTTP 500s, answers that are not
JSON, slow answers, a token that expires mid-training, a balance that runs out before the
collect boot. Transient faults are retried and the run succeeds; lasting ones end the run with
exit code 3 and one clear reason while the instance still powers itself off, and once the cause
is gone `runner resume` brings the artifacts back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.emulator.cloud import admin, runner, tiny_job
from tests.faults.checks import assert_artifacts_intact, assert_gpu_time_bounded, assert_store_consistent
from tests.faults.conftest import chosen
from tests.faults.kills import EXPECTED, SETUP, TRAIN, log_has, phase_started, submit_acting

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
FAULTS = "/emulator/v1/faults"

TRANSIENT = {
    "http-500": {"http_500": 3},
    "not-json": {"malformed": 2},
    "slow": {"slow_s": 1.5},
}
LASTING = {
    "token-expires-mid-training": ({"expire_token": True}, {"expire_token": False}, "token"),
    "balance-runs-out-before-collect": ({"low_balance": True}, {"low_balance": False}, "balance"),
}


@pytest.mark.parametrize("fault", chosen(TRANSIENT, {"http-500", "not-json"}))
def test_transient_api_faults_mid_run_are_retried(cloud, tmp_path, tiny_image, fault):
    spec = tiny_job(tmp_path, tiny_image, f"api-{fault}", TRAIN, setup=SETUP)
    try:
        code, payload, stderr = submit_acting(
            cloud, spec, phase_started("stage"), lambda: admin(cloud, FAULTS, TRANSIENT[fault])
        )
    finally:
        admin(cloud, FAULTS, {"http_500": 0, "malformed": 0, "slow_s": 0})
    assert code == 0, stderr[-4000:]
    assert (Path(payload["run_dir"]) / "artifacts" / "result").read_text() == EXPECTED
    assert_artifacts_intact(payload)
    assert_gpu_time_bounded(cloud, payload["run_id"])
    assert_store_consistent(cloud, payload["run_id"])


@pytest.mark.parametrize("fault", chosen(LASTING, {"token-expires-mid-training"}))
def test_a_lasting_api_fault_fails_clearly_powers_off_and_resume_collects(cloud, tmp_path, tiny_image, fault):
    inject, clear, word = LASTING[fault]
    spec = tiny_job(tmp_path, tiny_image, f"api-{fault}"[:40], TRAIN, setup=SETUP)
    try:
        code, payload, stderr = submit_acting(
            cloud, spec, log_has("train.log", "training"), lambda: admin(cloud, FAULTS, inject)
        )
    finally:
        admin(cloud, FAULTS, clear)
    assert code == 3, stderr[-4000:]
    assert word in payload["error"]
    assert_gpu_time_bounded(cloud, payload["run_id"])  # the watchdog powered off without the laptop

    resumed = runner(cloud, "resume", payload["run_id"], "--json", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    done = json.loads(resumed.stdout)
    assert (Path(done["run_dir"]) / "artifacts" / "result").read_text() == EXPECTED
    assert_artifacts_intact(done)
    assert_store_consistent(cloud, payload["run_id"])
