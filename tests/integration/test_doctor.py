"""`runner doctor`: every problem of a job found in one pass, each with its fix; credentials
reported as set or not, never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import paramiko
import pytest

pytestmark = pytest.mark.integration


def doctor(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "runner", "doctor", *args]
    environment = {**os.environ, "RUNNER_HOME": str(tmp_path / "home"), **env}
    return subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_machine_with_a_docker_engine_passes(docker_engine, tmp_path):
    done = doctor(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK    docker engine: version " in done.stdout and "all checks passed" in done.stderr


@pytest.mark.security
def test_every_problem_of_a_job_is_named_with_its_fix_and_no_secret_is_shown(docker_engine, tmp_path):
    key = tmp_path / "id_rsa"
    paramiko.RSAKey.generate(2048).write_private_key_file(str(key))
    key.chmod(0o644)
    (tmp_path / "job.yaml").write_text(
        "name: checked\n"
        "provider: {type: ssh, host: 127.0.0.1, key_file: id_rsa}\n"
        f"image: {{ref: 'sha256:{'0' * 64}'}}\n"
        "train: {run: 'true', secrets: [HF_TOKEN, WANDB_KEY]}\n"
        "outputs: [/out]\n",
        encoding="utf-8",
    )
    planted = "tok-" + os.urandom(8).hex()
    done = doctor(tmp_path, "job.yaml", "--json", HF_TOKEN=planted)
    assert done.returncode == 2
    assert planted not in done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["secret HF_TOKEN"] == {
        "name": "secret HF_TOKEN", "status": "ok", "detail": "$HF_TOKEN is set (value not shown)", "fix": "",
    }  # fmt: skip
    assert checks["secret WANDB_KEY"]["fix"] == "export WANDB_KEY=... in this shell"
    assert checks["image"]["status"] == "warn" and "not in the local engine" in checks["image"]["detail"]
    assert checks["ssh key"]["status"] == "warn" and checks["ssh key"]["fix"] == f"chmod 600 {key}"


def test_an_invalid_spec_is_one_failed_check_pointing_at_validate(docker_engine, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: BAD\n", encoding="utf-8")
    done = doctor(tmp_path, "bad.yaml")
    assert done.returncode == 2
    assert "FAIL  job spec: " in done.stdout and "fix: runner validate bad.yaml" in done.stdout
