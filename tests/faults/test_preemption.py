"""The instance powered off from outside (preempted, or stopped in the provider's console) while
a run stages or trains, with the controller still there: staging is done again on a new boot
without the GPU, and training starts again from its last checkpoint on a new GPU boot. The run
succeeds with whole artifacts and no GPU time past the watchdog's bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import admin, intervals, tiny_job
from tests.faults.checks import assert_artifacts_intact, assert_gpu_time_bounded, assert_store_consistent
from tests.faults.kills import SETUP, log_has, submit_acting

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# A trainer that checkpoints its step to /out after each of 6 steps and starts from the last
# checkpoint; its result: the set-up's banner, how often set-up and training started, and the
# step each training start began from.
TRAIN = (
    "echo $$ >> /data/train-starts; step=$(cat /out/ckpt 2>/dev/null || echo 0);"
    " echo $step >> /data/resumed-from; echo training from step $step;"
    " while [ $step -lt 6 ]; do sleep 1; step=$((step + 1));"
    " echo $step > /out/ckpt.tmp && mv /out/ckpt.tmp /out/ckpt; echo step $step; done;"
    " { cat /data/prepared; wc -l < /data/setup-starts; wc -l < /data/train-starts;"
    " tr '\\n' ' ' < /data/resumed-from; echo; } > /out/result"
)


def power_off_from_outside(env: dict, runs: Path) -> None:
    (run_dir,) = runs.iterdir()
    with Store(Path(env["RUNNER_HOME"])) as store:
        (acquired,) = [e.data for e in store.events(run_dir.name) if e.kind == "instance.acquired"]
    admin(env, "/api/v1/instance/power_off", {"instance_uuid": acquired["id"]})


def preempted_run(env: dict, spec: Path, moment) -> tuple[dict, list[str]]:
    runs = spec.parent / "runs"
    code, payload, stderr = submit_acting(env, spec, moment, lambda: power_off_from_outside(env, runs))
    assert code == 0, stderr[-4000:]
    assert "was powered off from outside (preempted?)" in stderr
    assert_artifacts_intact(payload)
    assert_gpu_time_bounded(env, payload["run_id"])
    assert_store_consistent(env, payload["run_id"])
    result = [
        line.strip() for line in (Path(payload["run_dir"]) / "artifacts" / "result").read_text().splitlines()
    ]
    return payload, result


def test_preempted_while_staging_stages_again_on_a_new_boot(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "preempted-staging", TRAIN, setup=SETUP)
    payload, result = preempted_run(cloud, spec, log_has("setup-01-prepare.log", "preparing"))
    assert result == ["emulated", "2", "1", "0"]  # set-up started again, training once
    modes = [i["mode"] for i in intervals(cloud, payload["run_id"])]
    assert modes == ["non_gpu", "non_gpu", "gpu", "non_gpu"], modes


def test_preempted_while_training_resumes_from_the_checkpoint_on_a_new_gpu_boot(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "preempted-training", TRAIN, setup=SETUP)
    payload, result = preempted_run(cloud, spec, log_has("train.log", "step 2"))
    banner, setups, trains, resumed_from = result
    assert (banner, setups, trains) == ("emulated", "1", "2")
    first, second = (int(step) for step in resumed_from.split())
    assert first == 0 and second >= 2  # the second start began from the last checkpoint, not from 0
    modes = [i["mode"] for i in intervals(cloud, payload["run_id"])]
    # set-up; training cut; a look without the GPU (the trainer had not ended); training; collect
    assert modes == ["non_gpu", "gpu", "non_gpu", "gpu", "non_gpu"], modes
