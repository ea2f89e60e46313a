"""Whole runs on the emulator, started as a user would (`runner emulator up`, `runner submit`):
set-up on the no-GPU boot, training on the GPU boot, the instance off at the end whatever
happened, asserted from the emulator's own power log and the run's recorded phases."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.store import Store
from tests.emulator.cloud import REPO, admin, intervals, phase_times, runner, submit, tiny_job, within


@pytest.fixture(scope="module")
def emulated_smoke(cloud, tmp_path_factory):
    """One run of jobs/smoke-emulated.yaml (built from this checkout): its `submit --json` payload."""
    text = (REPO / "jobs" / "smoke-emulated.yaml").read_text(encoding="utf-8")
    spec = tmp_path_factory.mktemp("smoke-emulated") / "smoke-emulated.yaml"
    spec.write_text(text.replace("context: ..", f"context: {REPO}"), encoding="utf-8")
    try:
        code, payload, stderr = submit(cloud, spec)
        assert code == 0, stderr[-4000:]
        yield payload
    finally:
        subprocess.run(["docker", "rmi", "runner/smoke-emulated:latest"], capture_output=True, timeout=120)


def watchdog_log(run_dir: Path) -> list[dict]:
    text = (run_dir / "logs" / "watchdog.log").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.integration
@pytest.mark.e2e
def test_smoke_job_stages_without_the_gpu_trains_with_it_and_ends_off(cloud, emulated_smoke):
    payload = emulated_smoke
    run_dir = Path(payload["run_dir"])
    for artifact in payload["artifacts"]:
        assert hashlib.sha256((run_dir / artifact["path"]).read_bytes()).hexdigest() == artifact["sha256"]
    scores = json.loads((run_dir / "artifacts" / "eval.json").read_text(encoding="utf-8"))
    assert scores["lora"]["loss"] < scores["base"]["loss"]

    cpu, gpu, collect = intervals(cloud, payload["run_id"])
    assert (cpu["mode"], gpu["mode"], collect["mode"]) == ("non_gpu", "gpu", "non_gpu")
    assert all(i["ended_at"] is not None for i in (cpu, gpu, collect))  # off at the end
    phases = phase_times(cloud, payload["run_id"])
    assert within(phases["stage"], cpu)  # image, inputs and set-up steps: all on the no-GPU boot
    # The trainer's end: the controller's, or the watchdog's when its power-off won the race
    # (then the controller reads the end on the collect boot, after the GPU interval)
    off = [e["ts"] for e in watchdog_log(run_dir) if e["action"] == "power_off"]
    assert within((phases["train"][0], off[0] if off else phases["train"][1]), gpu)
    with Store(Path(cloud["RUNNER_HOME"])) as store:
        (fetched,) = [e.ts for e in store.events(payload["run_id"]) if e.kind == "artifacts.collected"]
    assert collect["started_at"] < fetched < collect["ended_at"]  # after training: on a no-GPU boot
    assert cpu["ended_at"] <= gpu["started_at"] and gpu["ended_at"] <= collect["started_at"]
    print(
        json.dumps(
            {
                "cpu_s": cpu["seconds"],
                "gpu_s": gpu["seconds"],
                "train_s": phases["train"][1] - phases["train"][0],
            }
        )
    )


@pytest.mark.integration
@pytest.mark.e2e
def test_the_emulated_smoke_run_reproduces_bitwise_on_a_new_instance(cloud, emulated_smoke, tmp_path):
    original = emulated_smoke["run_id"]
    again = runner(cloud, "reproduce", original, "--json", "--out", str(tmp_path / "runs"), timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    payload = json.loads(again.stdout)
    report = payload["reproduction"]
    assert {"artifacts/lora.safetensors", "artifacts/adapter_model.safetensors"} <= set(report["identical"])
    assert report["loss"]["max_abs_diff"] == 0.0 and report["loss"]["within"]
    assert (
        len(
            {i["instance_uuid"] for i in intervals(cloud, payload["run_id"])}
            | {i["instance_uuid"] for i in intervals(cloud, original)}
        )
        == 2
    )  # each run made its own instance: the image travelled again and gave the same bits


@pytest.mark.integration
@pytest.mark.e2e
def test_a_failing_train_step_still_powers_the_instance_off(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "emulated-fail", "echo boom >&2; exit 3")
    code, payload, stderr = submit(cloud, spec)
    assert code == 1, stderr[-4000:]
    assert "train exited with code 3" in payload["error"]
    log = intervals(cloud, payload["run_id"])
    assert [i["mode"] for i in log] == ["non_gpu", "gpu"] and all(i["ended_at"] for i in log)


@pytest.mark.integration
@pytest.mark.e2e
def test_sigterm_during_training_powers_the_instance_off(cloud, tmp_path, tiny_image):
    """The laptop's controller killed politely mid-training: teardown still ends GPU billing."""
    import signal
    import time

    spec = tiny_job(tmp_path, tiny_image, "emulated-term", "echo training; sleep 300")
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--json", "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(argv, env=cloud, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(
            i["mode"] == "gpu" and i["ended_at"] is None for i in admin(cloud, "/emulator/v1/power_log")
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the GPU boot never came"
            time.sleep(0.5)
        time.sleep(3)  # into the train step
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-4000:]
    payload = json.loads(stdout)
    log = intervals(cloud, payload["run_id"])
    assert [i["mode"] for i in log] == ["non_gpu", "gpu"] and all(i["ended_at"] for i in log)
    status = runner(cloud, "status", payload["run_id"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["left_running"] is None
