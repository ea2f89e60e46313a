"""The on-instance watchdog: the GPU stops billing within a bound of training ending or stalling,
whether or not the laptop is there, asserted from the emulator's own power log."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import intervals, runner, submit, tiny_job
from tests.emulator.test_resume import log_has, submit_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

INTERVAL_S = 1.0
BOUND_S = INTERVAL_S + 4  # a watchdog interval, plus `shutdown` and the emulator's bookkeeping
GUARD = f"watchdog: {{interval_s: {INTERVAL_S}, stall_s: 4, grace_s: 5}}\n"


def guarded_job(folder: Path, image_id: str, name: str, train: str) -> Path:
    spec = tiny_job(folder, image_id, name, train)
    spec.write_text(spec.read_text() + GUARD)
    return spec


def watchdog_log(env: dict, run_id: str) -> list[dict]:
    """The watchdog's decisions, read from the (powered-off) instance's data disk, where a
    failed run's folder is kept."""
    with Store(Path(env["RUNNER_HOME"])) as store:
        (acquired,) = [e.data for e in store.events(run_id) if e.kind == "instance.acquired"]
    source = f"runner-emulator-{acquired['id']}:/root/autodl-tmp/runner/runs/{run_id}/watchdog.log"
    copied = subprocess.run(["docker", "cp", source, "-"], capture_output=True, timeout=60, check=True)
    text = subprocess.run(["tar", "-xO"], input=copied.stdout, capture_output=True, check=True).stdout
    return [json.loads(line) for line in text.decode().splitlines()]


def test_with_the_laptop_gone_the_instance_powers_off_after_training_and_resume_collects(
    cloud, tmp_path, tiny_image
):
    train = "echo training; sleep 8; cat /data/prepared > /out/result"
    spec = guarded_job(tmp_path, tiny_image, "watchdog-alone", train)
    run_id = submit_until(cloud, spec, log_has("train.log", "training"))  # SIGKILL: no teardown
    killed_at = time.time()

    deadline = time.monotonic() + 60
    while (gpu := intervals(cloud, run_id)[-1])["ended_at"] is None:
        assert time.monotonic() < deadline, "the instance kept billing the GPU after training"
        time.sleep(0.5)
    assert gpu["mode"] == "gpu"
    # the trainer ran at most 8 s after the kill; the instance went off within the bound after
    assert gpu["ended_at"] - killed_at <= 8 + BOUND_S

    done = runner(cloud, "resume", run_id, "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (Path(json.loads(done.stdout)["run_dir"]) / "artifacts" / "result").read_text() == "emulated\n"
    log = intervals(cloud, run_id)
    assert [i["mode"] for i in log] == ["non_gpu", "gpu", "non_gpu"]  # collected without the GPU
    text = (Path(json.loads(done.stdout)["run_dir"]) / "logs" / "watchdog.log").read_text()  # brought home
    decisions = [json.loads(line) for line in text.splitlines()]
    assert [d["action"] for d in decisions] == ["start", "power_off"]
    assert decisions[-1]["reason"] == "the trainer exited with code 0"


def test_a_stalled_trainer_is_stopped_and_the_instance_powered_off(cloud, tmp_path, tiny_image):
    steps = "; ".join(
        f'echo \'{{"step": {i}, "loss": 1.0}}\' >> /out/metrics.jsonl; sleep 0.5' for i in (1, 2, 3)
    )
    train = (
        f"trap 'echo got TERM; exit 143' TERM; echo partial > /out/result; {steps}; echo hanging;"
        " while true; do sleep 1; done"
    )
    spec = guarded_job(tmp_path, tiny_image, "watchdog-stall", train)
    code, payload, stderr = submit(cloud, spec)
    assert code == 1, stderr[-4000:]
    assert payload["error"] == (
        "the watchdog stopped training: no new training step for 4s (last step 3);"
        " what it wrote until then was collected"
    )
    assert (Path(payload["run_dir"]) / "artifacts" / "result").read_text() == "partial\n"
    run_id = payload["run_id"]
    log = intervals(cloud, run_id)
    # the controller, cut off by the power-off, collected on a boot without the GPU
    assert [i["mode"] for i in log] == ["non_gpu", "gpu", "non_gpu"]
    assert all(i["ended_at"] for i in log)
    decisions = watchdog_log(cloud, run_id)
    assert [d["action"] for d in decisions] == ["start", "stop", "power_off"]
    assert decisions[1]["reason"] == "no new training step for 4s (last step 3)"
    assert log[1]["ended_at"] - decisions[1]["ts"] <= BOUND_S  # off soon after the trainer took SIGTERM
    assert decisions[2]["reason"].startswith("stopped: no new training step")
    train_log = (Path(payload["run_dir"]) / "logs" / "train.log").read_text()
    assert "got TERM" in train_log  # SIGTERM first: the trainer could checkpoint


def test_a_failing_trainer_powers_off_just_the_same(cloud, tmp_path, tiny_image):
    spec = guarded_job(tmp_path, tiny_image, "watchdog-fail", "echo boom; exit 3")
    run_id = submit_until(cloud, spec, log_has("train.log", "boom"), signum=signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (gpu := intervals(cloud, run_id)[-1])["ended_at"] is None:
        assert time.monotonic() < deadline, "the instance kept billing after the trainer failed"
        time.sleep(0.5)
    assert gpu["mode"] == "gpu"
    assert watchdog_log(cloud, run_id)[-1]["reason"] == "the trainer exited with code 3"
