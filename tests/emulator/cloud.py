"""Helpers for whole runs on an emulator started as a user starts it (`runner emulator up`):
the runner CLI in a subprocess, the emulator's admin API, and a tiny job on a tiny image."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from runner.store import Store

REPO = Path(__file__).parents[2]
BASE_IMAGE = "runner-base/bookworm:minbase"


def runner(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "runner", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def admin(env: dict, path: str, body: dict | None = None) -> object:
    """The emulator's own API (power log, faults), with the token from its private folder."""
    folder = Path(env["RUNNER_HOME"]) / "emulator"
    url = json.loads((folder / "server.json").read_text())["url"]
    token = (folder / "token").read_text().strip()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Authorization": token})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["data"]


def submit(env: dict, spec: Path, timeout: float = 900) -> tuple[int, dict, str]:
    out = spec.parent / "runs"
    done = runner(env, "submit", str(spec), "--json", "--out", str(out), timeout=timeout)
    return done.returncode, json.loads(done.stdout), done.stderr


def intervals(env: dict, run_id: str) -> list[dict]:
    """The power log of the run's instance, in order."""
    with Store(Path(env["RUNNER_HOME"])) as store:
        (acquired,) = [e.data for e in store.events(run_id) if e.kind == "instance.acquired"]
    log = admin(env, "/emulator/v1/power_log")
    return sorted((i for i in log if i["instance_uuid"] == acquired["id"]), key=lambda i: i["started_at"])


def phase_times(env: dict, run_id: str) -> dict[str, tuple[float, float]]:
    with Store(Path(env["RUNNER_HOME"])) as store:
        return {p.name: (p.started_at, p.ended_at) for p in store.phases(run_id) if p.status == "succeeded"}


def within(span: tuple[float, float], interval: dict) -> bool:
    return interval["started_at"] <= span[0] and span[1] <= interval["ended_at"]


def tiny_job(
    folder: Path,
    image_id: str,
    name: str,
    train: str,
    gpu_wait_s: int = 300,
    setup: str = "cat /banner > /data/prepared",
    api_timeout_s: float = 30,
) -> Path:
    spec = folder / f"{name}.yaml"
    spec.write_text(
        f"""name: {name}
provider: {{type: emulator, gpu_wait_s: {gpu_wait_s}, boot_timeout_s: 120, api_timeout_s: {api_timeout_s}}}
image: {{ref: '{image_id}'}}
setup:
  - {{name: prepare, run: {json.dumps(setup)}}}
train: {{gpus: 1, run: {json.dumps(train)}}}
outputs: [/out/result]
""",
        encoding="utf-8",
    )
    return spec
