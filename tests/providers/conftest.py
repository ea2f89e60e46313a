"""A real moto server (a local EC2 API) for the provider tests, one per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout:.0f}s")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """The URL of a moto_server on a free loopback port, with dummy credentials in the
    environment (and no profile or config file of the user's) for the whole session."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with log.open("wb") as out, pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_up(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ec2(moto_endpoint):
    import boto3

    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)


@pytest.fixture(scope="session")
def aws_account(ec2):
    """What an AWS spec names: an AMI from moto's default list, a key pair, a security group."""
    images = ec2.describe_images(Owners=["amazon"])["Images"] or ec2.describe_images()["Images"]
    image = next(i for i in images if i.get("RootDeviceName") and i.get("Architecture") == "x86_64")
    ec2.create_key_pair(KeyName="runner-test")
    group = ec2.create_security_group(GroupName="runner-test", Description="runner tests")["GroupId"]
    return {
        "ami": image["ImageId"],
        "root_device": image["RootDeviceName"],
        "key": "runner-test",
        "sg": group,
    }
