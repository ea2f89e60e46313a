"""An emulator per test module, in-process on a free 127.0.0.1 port with its own state folder.

The instance image is built once per session (tag = hash of the Dockerfile) from the local
base image; every container the emulator created is removed in teardown.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from infra.emulator import instances
from infra.emulator.server import EmulatorServer
from infra.emulator.service import Emulator
from infra.emulator.state import Config
from tests.emulator.cloud import BASE_IMAGE, runner
from tests.own_image import build_own_image


@dataclass
class Client:
    """A tiny HTTP client for the emulator: returns (HTTP status, envelope)."""

    url: str
    token: str

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if (token if token is not None else self.token) != "":
            headers["Authorization"] = token if token is not None else self.token
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ok(self, method: str, path: str, body: dict | None = None):
        status, answer = self.call(method, path, body)
        assert status == 200 and answer["code"] == "Success", answer
        return answer["data"]

    def snapshot(self, uuid: str) -> dict:
        return self.ok("GET", f"/api/v1/instance/snapshot?instance_uuid={uuid}")

    def wait_status(self, uuid: str, wanted: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.snapshot(uuid)
            if snap["status"] == wanted:
                return snap
            time.sleep(0.2)
        raise AssertionError(f"{uuid} did not become {wanted} within {timeout}s (now {snap['status']})")

    def create(self, name: str = "t") -> str:
        info = {"charge_type": "payg", "req_gpu_amount": 1, "image": "x", "instance_name": name}
        body = {"instance_info": info, "price_info": {}}
        return self.ok("POST", "/api/v1/order/instance/create/payg", body)

    def power_on(self, uuid: str, mode: str, prefix: str = "/api/v1/instance"):
        """Ask for a boot; (HTTP status, envelope)."""
        return self.call("POST", f"{prefix}/power_on", {"instance_uuid": uuid, "payload": mode})

    def boot(self, uuid: str, mode: str) -> dict:
        self.ok("POST", "/api/v1/instance/power_on", {"instance_uuid": uuid, "payload": mode})
        return self.wait_status(uuid, "running")

    def off(self, uuid: str) -> dict:
        self.ok("POST", "/api/v1/instance/power_off", {"instance_uuid": uuid})
        return self.wait_status(uuid, "shutdown")


def ssh(snap: dict, timeout: float = 30) -> paramiko.SSHClient:
    """Log in as root with the snapshot's port and password, retrying while sshd comes up."""
    deadline = time.monotonic() + timeout
    while True:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(snap["proxy_host"], snap["ssh_port"], "root", snap["root_password"],
                           timeout=5, banner_timeout=5, auth_timeout=5, look_for_keys=False,
                           allow_agent=False)  # fmt: skip
            return client
        except (OSError, paramiko.SSHException):
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=30)
    out = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def instance_image() -> str:
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=60).returncode:
        pytest.fail(f"emulator tests need the Docker engine and {BASE_IMAGE}; run scripts/test")
    return instances.ensure_image(BASE_IMAGE)


@pytest.fixture(scope="module")
def emulator_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emulator")


@pytest.fixture(scope="module")
def emulator(instance_image, emulator_home):
    """(Emulator, Client) with a 0.5 s boot delay; containers removed afterwards."""
    config = Config(boot_delay=0.5, cpu_mode_cpus=0.5, balance=100.0, gpu_price=2.15, cpu_price=0.10)
    service = Emulator(emulator_home, config, instance_image)
    token = secrets.token_urlsafe(16)
    server = EmulatorServer(("127.0.0.1", 0), service, token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield service, Client(server.url, token)
    finally:
        server.shutdown()
        server.server_close()
        service.close(power_off=False)
        for name in instances.containers_of(emulator_home):
            instances.remove(name)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, instance_image):
    """An emulator started as a user starts it (`runner emulator up`; 2 CPUs in no-GPU mode, so
    the rehearsal is quick) and the environment that reaches it; purged afterwards."""
    home = tmp_path_factory.mktemp("emulated-home")
    env = {**os.environ, "RUNNER_HOME": str(home), "RUNNER_EMULATOR_BASE": BASE_IMAGE}
    up = runner(env, "emulator", "up", "--boot-delay", "1", "--cpu-mode-cpus", "2")
    assert up.returncode == 0, up.stderr
    try:
        yield env
    finally:
        runner(env, "emulator", "down", "--purge")


@pytest.fixture(scope="module")
def tiny_image() -> str:
    """A small image on the base, so a whole emulated run takes seconds."""
    import docker

    client = docker.from_env()
    image_id = build_own_image(
        client, f"FROM {BASE_IMAGE}\nRUN echo emulated > /banner\n", "runner-test/emulated"
    )
    yield image_id
    client.images.remove(image_id, force=True)
    client.close()
