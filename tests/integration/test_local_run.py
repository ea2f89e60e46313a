"""Whole runs on the local provider against the real Docker engine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import quick_job, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smoke_run_passes_through_every_phase(smoke_run):
    payload = smoke_run["payload"]
    assert payload["status"] == "succeeded" and payload["exit_code"] == 0
    phases = {p["name"]: p["status"] for p in payload["phases"]}
    assert list(phases) == ["plan", "provision", "stage", "boot_gpu", "train", "collect", "teardown"]
    assert phases["provision"] == phases["boot_gpu"] == "skipped"
    assert {phases[name] for name in ("plan", "stage", "train", "collect", "teardown")} == {"succeeded"}


def test_artifacts_match_their_recorded_sha256(smoke_run):
    payload = smoke_run["payload"]
    run_dir = Path(payload["run_dir"])
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    recorded = {a["path"]: a["sha256"] for a in manifest["artifacts"]}
    assert {a["path"]: a["sha256"] for a in payload["artifacts"]} == recorded
    assert "artifacts/lora.safetensors" in recorded
    for path, digest in recorded.items():
        assert sha256(run_dir / path) == digest
    assert manifest["job"]["spec_sha256"] == sha256(smoke_run["spec"])
    assert manifest["status"] == "succeeded"


def test_loss_falls_and_weights_are_lora_only(smoke_run):
    from safetensors import safe_open

    run_dir = Path(smoke_run["payload"]["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    with safe_open(run_dir / "artifacts" / "lora.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
    assert keys and all("lora" in key for key in keys)
    scores = json.loads((run_dir / "artifacts" / "eval.json").read_text(encoding="utf-8"))
    assert scores["lora"]["loss"] < scores["base"]["loss"] - 0.5
    peft_config = json.loads((run_dir / "artifacts" / "adapter_config.json").read_text(encoding="utf-8"))
    assert peft_config["peft_type"] == "LORA" and sorted(peft_config["target_modules"]) == [
        "q_proj",
        "v_proj",
    ]


def test_logs_lock_file_and_image_are_recorded(smoke_run):
    run_dir = Path(smoke_run["payload"]["run_dir"])
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert {"image-build.log", "train.log", "setup-01-make-data.log", "setup-04-prepare.log"} <= logs
    assert "step" in (run_dir / "logs" / "train.log").read_text(encoding="utf-8")
    lock = json.loads(smoke_run["spec"].with_name("smoke.lock.json").read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert lock["image"]["id"] == manifest["image"]["image"]["id"]
    assert lock["image"]["id"].startswith("sha256:")
    assert lock["base"]["ref"] == "runner-base/torch-cpu:2.13.0"
    assert lock["base"]["id"].startswith("sha256:")


def test_status_and_runs_read_the_store(smoke_run):
    run_id = smoke_run["payload"]["run_id"]
    status = run_cli(smoke_run["home"], "status", run_id[:-2], "--json")
    assert status.code == 0
    assert status.json["run_id"] == run_id and status.json["artifacts"] == smoke_run["payload"]["artifacts"]
    runs = run_cli(smoke_run["home"], "runs", "--json").json["runs"]
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "succeeded"


def test_failing_setup_step_fails_the_run_and_keeps_its_log(image_id, tmp_path):
    spec = quick_job(
        tmp_path,
        image_id,
        setup="echo about to fail; exit 3",
        train="touch /out/never",
        outputs=["/out/never"],
    )
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 1
    payload = result.json
    assert payload["status"] == "failed"
    assert "setup:broken exited with code 3" in payload["error"]
    phases = {p["name"]: p["status"] for p in payload["phases"]}
    assert phases["stage"] == "failed" and phases["teardown"] == "succeeded" and "train" not in phases
    log = Path(payload["run_dir"]) / "logs" / "setup-01-broken.log"
    assert log.read_text(encoding="utf-8") == "about to fail\n"
    assert json.loads((Path(payload["run_dir"]) / "manifest.json").read_text())["status"] == "failed"


def test_a_second_run_never_overwrites_the_first(image_id, tmp_path):
    spec = quick_job(tmp_path, image_id, train="date +%s%N > /out/stamp", outputs=["/out/stamp"])
    home, out = tmp_path / "home", str(tmp_path / "runs")
    first = run_cli(home, "submit", str(spec), "--json", "--out", out).json
    first_file = Path(first["run_dir"]) / "artifacts" / "stamp"
    before = sha256(first_file)
    second = run_cli(home, "submit", str(spec), "--json", "--out", out).json
    assert first["run_dir"] != second["run_dir"]
    assert sha256(first_file) == before == first["artifacts"][0]["sha256"]
    assert second["artifacts"][0]["sha256"] != before


def test_inputs_are_hashed_and_mounted_at_data(image_id, tmp_path):
    data = tmp_path / "records.json"
    data.write_bytes(os.urandom(4096))
    digest = sha256(data)
    extra = "inputs:\n  - src: records.json\n    dest: sub/records.json\n"
    spec = quick_job(
        tmp_path,
        image_id,
        train="sha256sum /data/sub/records.json | cut -d' ' -f1 > /out/seen; cp /job/job.yaml /out/",
        outputs=["/out"],
        extra=extra,
    )
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 0, result.stderr
    run_dir = Path(result.json["run_dir"])
    assert (run_dir / "artifacts" / "seen").read_text().strip() == digest
    assert (run_dir / "artifacts" / "job.yaml").read_bytes() == spec.read_bytes()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["inputs"] == [
        {"src": str(data), "dest": "sub/records.json", "sha256": digest, "bytes": 4096}
    ]


def test_input_with_wrong_sha256_stops_before_staging(image_id, tmp_path):
    (tmp_path / "records.json").write_text("[]")
    extra = f"inputs:\n  - src: records.json\n    sha256: {'ab' * 32}\n"
    spec = quick_job(tmp_path, image_id, train="true", outputs=["/out"], extra=extra)
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 2
    assert "records.json: sha256 is" in result.json["error"]
    assert [p["name"] for p in result.json["phases"]] == ["plan", "teardown"]


def test_missing_declared_output_fails_the_run(image_id, tmp_path):
    spec = quick_job(tmp_path, image_id, train="touch /out/a", outputs=["/out/a", "/out/b"])
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 1
    assert result.json["error"] == "declared outputs were not written: /out/b"


@pytest.mark.security
def test_output_symlink_out_of_the_container_is_refused(image_id, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("do not copy me")
    spec = quick_job(tmp_path, image_id, train=f"ln -s {secret} /out/leak", outputs=["/out"])
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 1
    assert "output leak is a link; refusing to follow it" in result.json["error"]
    assert not list((Path(result.json["run_dir"]) / "artifacts").rglob("leak"))


def test_train_failure_exit_code_and_log(image_id, tmp_path):
    spec = quick_job(tmp_path, image_id, train="echo boom >&2; exit 7", outputs=["/out"])
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 1
    assert "train exited with code 7" in result.json["error"]
    assert (Path(result.json["run_dir"]) / "logs" / "train.log").read_text() == "boom\n"
    assert "boom" in result.stderr


def test_pinned_image_that_is_absent_is_bad_input(docker_engine, tmp_path):
    spec = quick_job(tmp_path, "sha256:" + "f" * 64, train="true", outputs=["/out"])
    result = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert result.code == 2
    assert "is not in the local engine" in result.json["error"]


def test_sigterm_during_training_tears_down_and_records_it(image_id, tmp_path, docker_engine):
    """A killed controller must not leave the job's container running."""
    spec = quick_job(tmp_path, image_id, train="echo started; sleep 300", outputs=["/out"])
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home")}
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--json", "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The first line names the run, so only this run's container is waited for.
        run_id = proc.stderr.readline().split()[1]
        _wait_for_container(
            docker_engine, {"dev.runner.run-id": run_id, "dev.runner.step": "train"}, timeout=120
        )
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    payload = json.loads(stdout)
    assert payload["run_id"] == run_id
    assert payload["status"] == "interrupted" and payload["error"] == "interrupted (SIGTERM)"
    phases = {p["name"]: p["status"] for p in payload["phases"]}
    assert phases["train"] == "interrupted" and phases["teardown"] == "succeeded"
    left = docker_engine.containers.list(
        all=True, filters={"label": f"dev.runner.run-id={payload['run_id']}"}
    )
    assert left == []


def _wait_for_container(client, labels: dict[str, str], timeout: float) -> None:
    filters = {"label": [f"{k}={v}" for k, v in labels.items()], "status": "running"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.containers.list(filters=filters):
            return
        time.sleep(0.2)
    raise AssertionError(f"no running container with {labels} within {timeout} s")


@pytest.mark.security
def test_secrets_reach_the_container_and_nothing_records_them(image_id, tmp_path):
    token = "s3cr3t-" + os.urandom(8).hex()
    spec = quick_job(
        tmp_path,
        image_id,
        train='printf %s "$HF_TOKEN" > /out/seen; cp /job/spec.json /out/',
        outputs=["/out"],
        extra="",
    )
    spec.write_text(spec.read_text().replace("train: {gpus: 0,", "train: {gpus: 0, secrets: [HF_TOKEN],"))
    home = tmp_path / "home"
    env = {**os.environ, "RUNNER_HOME": str(home), "HF_TOKEN": token}
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--json", "--out", str(tmp_path / "runs")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(json.loads(proc.stdout)["run_dir"])
    assert (run_dir / "artifacts" / "seen").read_text() == token
    recorded = [p for p in run_dir.rglob("*") if p.is_file() and p.name != "seen"]  # logs, manifest, ...
    recorded += list(home.rglob("state.db*"))  # the store, its manifests table included
    assert run_dir / "manifest.json" in recorded and run_dir / "logs" / "train.log" in recorded
    assert [path for path in recorded if token.encode() in path.read_bytes()] == []
    assert token not in proc.stdout + proc.stderr

    missing = run_cli(home, "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert missing.code == 2
    assert missing.json["error"] == "secrets not set in the environment: HF_TOKEN"
    assert [p["name"] for p in missing.json["phases"]] == ["plan", "teardown"]


def test_the_run_leaves_a_loss_chart_whose_csv_matches_its_metrics(smoke_run, tmp_path):
    import csv
    import struct

    run_dir = Path(smoke_run["payload"]["run_dir"])
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (800, 450)
    rows = list(csv.DictReader((run_dir / "loss.csv").open(encoding="utf-8")))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {int(r["step"]): float(r["loss"]) for r in rows if r["loss"]} == {
        m["step"]: m["loss"] for m in metrics if "loss" in m
    }
    assert {int(r["step"]) for r in rows if r["val_loss"]} == {m["step"] for m in metrics if "val_loss" in m}

    run_id = smoke_run["payload"]["run_id"]
    shown = run_cli(smoke_run["home"], "status", run_id)
    (line,) = [line for line in shown.stdout.splitlines() if line.strip().startswith("loss ")]
    assert "(60 steps)" in line
    both = run_cli(smoke_run["home"], "plot", run_id, run_id, "-o", str(tmp_path / "two.png"))
    assert both.code == 0 and both.stdout.strip() == str(tmp_path / "two.png")
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_shows_answers_before_and_after_fine_tuning(smoke_run):
    run_id = smoke_run["payload"]["run_id"]
    shown = run_cli(smoke_run["home"], "compare", run_id, "--json")
    assert shown.code == 0, shown.stderr
    samples = shown.json["samples"]
    assert len(samples) == 4 and samples[0]["prompt"] == "浙江省的省会是哪里？"
    assert any(s["before"] != s["after"] for s in samples)  # trained adapters change the answers
    assert all(s["after_stop_reason"] in ("eos", "length") and s["after_tokens"] >= 1 for s in samples)
    table = run_cli(smoke_run["home"], "compare", run_id)
    assert table.code == 0 and "before and after fine-tuning" in table.stdout and "浙江省" in table.stdout
    first = samples[0]
    assert f"[{first['after_stop_reason']}, {first['after_tokens']} tokens]" in table.stdout
