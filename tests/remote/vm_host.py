"""A VM-like test host: a network namespace of its own with sshd and a second Docker engine.

Rented VMs (AWS, a GPU box) have their own Docker engine; this host stands in for one. It
shares this machine's file system (the tests use a data folder of their own), but it has its
own address on a private /24 that only this test creates, its own sshd (host key made here)
and its own dockerd (data root, exec root and socket under the host's folder, no bridge, no
iptables: both would touch this machine's network). Logins get DOCKER_HOST pointing at that
engine through sshd's SetEnv, as a VM's users get their engine by default.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from runner.remote import Endpoint
from tests.remote.conftest import KeyPair, fingerprint_of, make_key_pair, wait_for_sshd

SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 60


@dataclass
class VmHost:
    """A started VM-like host; stop() undoes everything start_vm_host() made."""

    folder: Path
    namespace: str
    veth: str
    address: str
    host_fingerprint: str
    root_key: Path
    docker_socket: str
    dockerd: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return 22

    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, 22, "root", self.root_key)

    def docker(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The host's own engine, from outside SSH (to inspect or sabotage)."""
        return subprocess.run(
            ["docker", "-H", f"unix://{self.docker_socket}", *argv],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def stop(self) -> None:
        self.docker("rm", "-f", *self.docker("ps", "-aq").stdout.split(), timeout=120)
        if self.dockerd is not None:
            self.dockerd.terminate()
            try:
                self.dockerd.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.dockerd.kill()
                self.dockerd.wait(timeout=30)
        _terminate(self.folder / "sshd.pid")
        exec_root = self.folder / "x"
        subprocess.run(["umount", "-l", str(exec_root / "netns" / "default")], capture_output=True)
        subprocess.run(["umount", "-l", str(self.folder / "d")], capture_output=True)  # a small data root
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)  # gone with the namespace
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.folder)], capture_output=True)


def start_vm_host(folder: Path, login_key: KeyPair, data_root_mb: int | None = None) -> VmHost:
    """Make the namespace, start sshd and dockerd in it, wait until both answer. With
    data_root_mb the engine keeps its images on a tmpfs of that size (a small disk)."""
    for tool in (SSHD, "/usr/sbin/ip", "/usr/bin/nsenter", "/usr/sbin/dockerd"):
        if not os.access(tool, os.X_OK):
            raise RuntimeError(f"the VM-like test host needs {tool}; run scripts/ensure-test-hosts")
    suffix = secrets.token_hex(3)
    subnet = f"10.{random.randint(200, 250)}.{random.randint(1, 250)}"
    host = VmHost(
        folder=folder,
        namespace=f"runner-vm-{suffix}",
        veth=f"rvm{suffix}",
        address=f"{subnet}.2",
        host_fingerprint="",
        root_key=login_key.private_file,
        docker_socket=str(folder / "docker.sock"),
    )
    try:
        _make_namespace(host, subnet)
        host.host_fingerprint = _start_sshd(host, login_key)
        if data_root_mb is not None:
            (folder / "d").mkdir()
            argv = ["mount", "-t", "tmpfs", "-o", f"size={data_root_mb}m", "tmpfs", str(folder / "d")]
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        _start_dockerd(host)
    except BaseException:
        host.stop()
        raise
    return host


def _make_namespace(host: VmHost, subnet: str) -> None:
    inside = f"{host.veth}g"
    for argv in (
        ["ip", "netns", "add", host.namespace],
        ["ip", "link", "add", host.veth, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", host.namespace],
        ["ip", "addr", "add", f"{subnet}.1/24", "dev", host.veth],
        ["ip", "link", "set", host.veth, "up"],
        ["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inside],
        ["ip", "-n", host.namespace, "link", "set", inside, "up"],
        ["ip", "-n", host.namespace, "link", "set", "lo", "up"],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _start_sshd(host: VmHost, login_key: KeyPair) -> str:
    host_key = make_key_pair(host.folder, "host_key")
    authorized = host.folder / "authorized_keys"
    authorized.write_text(login_key.public_line + "\n", encoding="utf-8")
    authorized.chmod(0o600)
    config = host.folder / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {host.address}:22",
                f"HostKey {host_key.private_file}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {host.folder / 'sshd.pid'}",
                "StrictModes no",
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "MaxStartups 50",
                "Subsystem sftp internal-sftp",
                f"SetEnv DOCKER_HOST=unix://{host.docker_socket}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    log = host.folder / "sshd.log"
    argv = ["ip", "netns", "exec", host.namespace, SSHD, "-f", str(config), "-E", str(log)]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    wait_for_sshd(22, timeout=START_TIMEOUT_S, address=host.address)
    return fingerprint_of(host_key.public_line)


def _start_dockerd(host: VmHost) -> None:
    """dockerd enters the namespace with nsenter: `ip netns exec` remounts /sys, and dockerd
    then fails to find the devices cgroup."""
    argv = [
        "nsenter", f"--net=/run/netns/{host.namespace}", "dockerd",
        "--data-root", str(host.folder / "d"), "--exec-root", str(host.folder / "x"),
        "--pidfile", str(host.folder / "dockerd.pid"), "-H", f"unix://{host.docker_socket}",
        "--bridge=none", "--iptables=false", "--ip6tables=false",
    ]  # fmt: skip
    with (host.folder / "dockerd.log").open("wb") as log:
        host.dockerd = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while host.docker("version", timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            log_tail = (host.folder / "dockerd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the VM-like host's dockerd did not answer: {log_tail}")
        time.sleep(0.5)


def _terminate(pid_file: Path, timeout: float = 30) -> None:
    """SIGTERM the daemon in pid_file (not a child of ours) and wait for it to go."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
