"""`runner emulator up|status|down` end to end: a detached server, its private folder, cleanup."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infra.emulator import connection, emulator_home
from infra.emulator.instances import containers_of

pytestmark = pytest.mark.integration


def runner(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "runner", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_up_status_down_purge(instance_image, runner_home, monkeypatch):
    monkeypatch.setenv("RUNNER_EMULATOR_BASE", "runner-base/bookworm:minbase")
    up = runner("emulator", "up", "--boot-delay", "0", "--balance", "5")
    try:
        assert up.returncode == 0, up.stderr
        url, token = connection()
        assert url.startswith("http://127.0.0.1:") and url in up.stdout + up.stderr
        assert token not in up.stdout + up.stderr + (emulator_home() / "emulator.log").read_text()
        assert (emulator_home() / "token").stat().st_mode & 0o777 == 0o600
        assert emulator_home().stat().st_mode & 0o777 == 0o700
        again = runner("emulator", "up")
        assert again.returncode == 2 and "already running" in again.stderr

        import urllib.request

        def call(path: str, body: dict) -> dict:
            request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Authorization": token})
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())["data"]

        uuid = call("/api/v1/order/instance/create/payg", {"instance_info": {"instance_name": "cli"}})
        call("/api/v1/instance/power_on", {"instance_uuid": uuid, "payload": "non_gpu"})
        status = runner("emulator", "status", "--json")
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["url"] == url and shown["balance"] <= 5
        assert [(i["uuid"], i["mode"]) for i in shown["instances"]] == [(uuid, "non_gpu")]

        down = runner("emulator", "down")
        assert down.returncode == 0, down.stderr
        state = json.loads((emulator_home() / "state.json").read_text())
        assert all(i["ended_at"] is not None for i in state["power_log"])
        assert [i["status"] for i in state["instances"]] == ["shutdown"]
        assert runner("emulator", "status").returncode == 2
    finally:
        runner("emulator", "down", "--purge")
    assert not emulator_home().exists()
    assert containers_of(emulator_home()) == []
