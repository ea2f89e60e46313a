"""Fixtures that need the real Docker engine and the offline base image (scripts/test builds both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
BASE_IMAGE = os.environ.get("RUNNER_BASE_TAG", "runner-base/torch-cpu:2.13.0")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


def run_cli(home: Path, *args: str, timeout: float = 900) -> CliResult:
    """Drive the real `runner` command in a subprocess with its own RUNNER_HOME."""
    env = {**os.environ, "RUNNER_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def docker_engine():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(BASE_IMAGE)
    except Exception as exc:  # report, do not skip: these tests must run where the suite runs
        pytest.fail(f"integration tests need the Docker engine and {BASE_IMAGE}; run scripts/test ({exc})")
    yield client
    client.close()


@pytest.fixture(scope="session")
def smoke_run(docker_engine, tmp_path_factory):
    """One real run of the smoke job (built from this checkout), shared by the tests that inspect it."""
    folder = tmp_path_factory.mktemp("smoke")
    spec = folder / "smoke.yaml"
    text = (REPO / "jobs" / "smoke.yaml").read_text(encoding="utf-8")
    spec.write_text(text.replace("context: ..", f"context: {REPO}"), encoding="utf-8")
    home = folder / "home"
    result = run_cli(home, "submit", str(spec), "--json", "--out", str(folder / "runs"))
    assert result.code == 0, result.stderr[-4000:]
    return {"result": result, "home": home, "spec": spec, "payload": result.json}


@pytest.fixture(scope="session")
def image_id(docker_engine) -> str:
    """The base image's ID: quick jobs pin it by `ref` and need nothing built."""
    return docker_engine.images.get(BASE_IMAGE).id


def quick_job(
    folder: Path, image_id: str, *, setup: str = "", train: str, outputs: list[str], extra: str = ""
):
    """A small job on the already-built image; returns the spec path."""
    lines = [
        "name: quick",
        "provider: {type: local}",
        f"image: {{ref: '{image_id}'}}",
        f"train: {{gpus: 0, run: {json.dumps(train)}}}",
        "outputs: " + json.dumps(outputs),
    ]
    if setup:
        lines.append(f"setup:\n  - name: broken\n    run: {json.dumps(setup)}")
    spec = folder / "quick.yaml"
    spec.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra), encoding="utf-8")
    return spec
