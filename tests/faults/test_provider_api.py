"""The provider's API misbehaving during a run on the emulator: HTTP 500s, answers that are not
JSON, slow answers, answers lost after the call took effect (the client timed out), no GPU in
stock, a token that expires mid-training, a balance that runs out. Transient faults are retried
and the run succeeds; lasting ones end the run with exit code 3 and one clear reason while the
instance still powers itself off (or never boots with the GPU), and once the cause is gone
`runner resume` brings the artifacts back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.emulator.cloud import admin, intervals, runner, submit, tiny_job
from tests.faults.checks import (
    assert_artifacts_intact,
    assert_gpu_time_bounded,
    assert_store_consistent,
    assert_whole_run,
    wait_powered_off,
)
from tests.faults.conftest import chosen
from tests.faults.kills import EXPECTED, SETUP, TRAIN, log_has, phase_started, submit_acting

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
FAULTS = "/emulator/v1/faults"
CLEAR = {"http_500": 0, "malformed": 0, "slow_s": 0, "late": 0, "late_s": 10.0, "no_gpu_stock": 0}
TIMEOUT_S = 2  # the spec's api_timeout_s: a late answer (4 s) times out

TRANSIENT = {
    "http-500": {"http_500": 3},
    "not-json": {"malformed": 2},
    "slow": {"slow_s": 1.5},
    "answers-lost-after-taking-effect": {"late": 3, "late_s": 2 * TIMEOUT_S},
}
LASTING = {
    "token-expires-mid-training": (log_has("train.log", "training"), {"expire_token": True}, "token"),
    "balance-runs-out-before-training": (
        log_has("setup-01-prepare.log", "preparing"),
        {"low_balance": True},
        "balance",
    ),
    "balance-runs-out-before-collect": (log_has("train.log", "training"), {"low_balance": True}, "balance"),
}
ENDED = {"expire_token": False, "low_balance": False}


@pytest.mark.parametrize(
    "fault", chosen(TRANSIENT, {"http-500", "not-json", "answers-lost-after-taking-effect"})
)
def test_transient_api_faults_mid_run_are_retried(cloud, tmp_path, tiny_image, fault):
    spec = tiny_job(tmp_path, tiny_image, f"api-{fault}"[:40], TRAIN, setup=SETUP, api_timeout_s=TIMEOUT_S)
    try:
        outcome = submit_acting(
            cloud, spec, phase_started("stage"), lambda: admin(cloud, FAULTS, TRANSIENT[fault])
        )
    finally:
        admin(cloud, FAULTS, CLEAR)
    assert_whole_run(cloud, *outcome)


def test_a_create_whose_answer_is_lost_makes_one_instance(cloud, tmp_path, tiny_image):
    """The create took effect but its answer came after the client gave up: the instance is
    found by the run's name, not created again (a second one would be billed, unseen)."""
    spec = tiny_job(tmp_path, tiny_image, "api-lost-create", TRAIN, setup=SETUP, api_timeout_s=TIMEOUT_S)
    before = {i["uuid"] for i in admin(cloud, "/emulator/v1/state")["instances"]}
    admin(cloud, FAULTS, {"late": 1, "late_s": 2 * TIMEOUT_S})
    try:
        code, payload, stderr = submit(cloud, spec)
    finally:
        admin(cloud, FAULTS, CLEAR)
    assert_whole_run(cloud, code, payload, stderr)
    made = [i for i in admin(cloud, "/emulator/v1/state")["instances"] if i["uuid"] not in before]
    assert [i["instance_name"] for i in made] == [f"runner-{payload['run_id']}"[:60]]
    assert "timed out" in stderr


@pytest.mark.parametrize(
    "fault", chosen(LASTING, {"token-expires-mid-training", "balance-runs-out-before-training"})
)
def test_a_lasting_api_fault_fails_clearly_powers_off_and_resume_collects(cloud, tmp_path, tiny_image, fault):
    moment, inject, word = LASTING[fault]
    spec = tiny_job(tmp_path, tiny_image, f"api-{fault}"[:40], TRAIN, setup=SETUP)
    try:
        code, payload, stderr = submit_acting(cloud, spec, moment, lambda: admin(cloud, FAULTS, inject))
    finally:
        admin(cloud, FAULTS, ENDED)
    assert code == 3, stderr[-4000:]
    assert word in payload["error"]
    wait_powered_off(cloud, payload["run_id"])  # the trainer goes on; the watchdog powers off at its end
    assert_gpu_time_bounded(cloud, payload["run_id"])

    resumed = runner(cloud, "resume", payload["run_id"], "--json", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    done = json.loads(resumed.stdout)
    assert (Path(done["run_dir"]) / "artifacts" / "result").read_text() == EXPECTED
    assert_artifacts_intact(done)
    assert_store_consistent(cloud, payload["run_id"])


def test_no_gpu_for_two_boots_waits_with_the_instance_off_then_trains(cloud, tmp_path, tiny_image):
    admin(cloud, FAULTS, {"no_gpu_stock": 2})
    try:
        code, payload, stderr = submit(
            cloud, tiny_job(tmp_path, tiny_image, "api-no-gpu-twice", TRAIN, setup=SETUP)
        )
    finally:
        admin(cloud, FAULTS, CLEAR)
    assert_whole_run(cloud, code, payload, stderr)
    assert stderr.count("no capacity for a gpu boot") == 2
    cpu, gpu, _ = intervals(cloud, payload["run_id"])
    assert (cpu["mode"], gpu["mode"]) == ("non_gpu", "gpu")
    assert gpu["started_at"] - cpu["ended_at"] >= 25  # 10 s + 20 s of backoff, powered off


def test_no_gpu_until_the_deadline_stops_the_run_with_the_instance_off(cloud, tmp_path, tiny_image):
    admin(cloud, FAULTS, {"no_gpu_stock": 5})
    try:
        spec = tiny_job(tmp_path, tiny_image, "api-no-gpu", TRAIN, setup=SETUP, gpu_wait_s=15)
        code, payload, stderr = submit(cloud, spec)
    finally:
        admin(cloud, FAULTS, CLEAR)
    assert code == 3, stderr[-4000:]
    assert (
        "no capacity for a gpu boot within 15s" in payload["error"] and "left powered off" in payload["error"]
    )
    log = intervals(cloud, payload["run_id"])
    assert [i["mode"] for i in log] == ["non_gpu"] and log[0]["ended_at"] is not None  # never paid for a GPU
    assert_store_consistent(cloud, payload["run_id"])

    resumed = runner(cloud, "resume", payload["run_id"], "--json", timeout=600)  # stock is back
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    done = json.loads(resumed.stdout)
    assert (Path(done["run_dir"]) / "artifacts" / "result").read_text() == EXPECTED
    assert_artifacts_intact(done)
    assert_gpu_time_bounded(cloud, payload["run_id"])
