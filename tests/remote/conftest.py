"""Test hosts for the SSH layer: containers running sshd, reached on 127.0.0.1 only.

The image is built once per tag (the tag carries a hash of the Dockerfile, so an edit
rebuilds it); every container gets a fresh host key, and the port stays free for a
replacement container, which is how the tests fake a recreated instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from docker.errors import ImageNotFound

from runner.images import docker_client
from runner.layers import LayerCache
from runner.remote import Endpoint

REPO = Path(__file__).parents[2]
DOCKERFILE = REPO / "docker" / "sshd-host.Dockerfile"
BASE_IMAGE = "runner-base/bookworm:minbase"


@dataclass(frozen=True)
class KeyPair:
    private_file: Path
    public_line: str
    private_pem: str


@dataclass(frozen=True)
class SshdHost:
    """A running test host: its container, port, host key fingerprint and login secrets."""

    container: str
    port: int
    host_fingerprint: str
    root_key: Path
    password: str

    def endpoint(self, **changes: object) -> Endpoint:
        """Root with the test key, unless changed (user, key_file, password)."""
        fields = {"host": "127.0.0.1", "port": self.port, "user": "root", "key_file": self.root_key}
        return Endpoint(**{**fields, **changes})

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        """Run a command in the container directly, outside SSH (to inspect or sabotage)."""
        return subprocess.run(
            ["docker", "exec", self.container, *argv], capture_output=True, text=True, timeout=60, check=True
        )


def _docker(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"docker {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def make_key_pair(folder: Path, name: str) -> KeyPair:
    """An ed25519 key pair in OpenSSH format, usable by paramiko and by sshd alike."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = folder / name
    path.write_text(pem, encoding="utf-8")
    path.chmod(0o600)
    return KeyPair(path, public.decode(), pem)


def fingerprint_of(public_line: str) -> str:
    """The SHA256:... fingerprint OpenSSH prints for a public key line."""
    import base64

    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_sshd(port: int, timeout: float = 30, address: str = "127.0.0.1") -> None:
    """Poll until sshd sends its banner on the port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=2) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"sshd on {address}:{port} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def sshd_image() -> str:
    """The test host image, built from docker/sshd-host.Dockerfile unless this version exists."""
    tag = "runner-test/sshd-host:" + hashlib.sha256(DOCKERFILE.read_bytes()).hexdigest()[:12]
    try:
        _docker("image", "inspect", BASE_IMAGE)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.fail(f"remote tests need the Docker engine and {BASE_IMAGE}; run scripts/test ({exc})")
    try:
        _docker("image", "inspect", tag)
    except RuntimeError:
        context = DOCKERFILE.parent  # the Dockerfile copies nothing; keep the context small
        _docker("build", "-q", "-t", tag, "-f", str(DOCKERFILE), str(context), timeout=600)
    return tag


@pytest.fixture(scope="session")
def root_key(tmp_path_factory) -> KeyPair:
    return make_key_pair(tmp_path_factory.mktemp("client-key"), "id_ed25519")


@pytest.fixture(scope="session")
def start_host(sshd_image, root_key, tmp_path_factory) -> Iterator[Callable[..., SshdHost]]:
    """A factory: start a test host with a new host key, on a given port or a free one."""
    started: list[str] = []
    folder = tmp_path_factory.mktemp("host-keys")

    def start(port: int | None = None, docker_args: tuple[str, ...] = ()) -> SshdHost:
        """docker_args: more `docker run` options (a small --tmpfs as a data disk, say)."""
        port = port or free_port()
        host_key = make_key_pair(folder, f"host-{secrets.token_hex(4)}")
        password = secrets.token_urlsafe(12)
        name = f"runner-sshd-{secrets.token_hex(4)}"
        _docker(
            "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:22",
            "-e", f"SSHD_HOST_KEY={host_key.private_pem}",
            "-e", f"SSHD_AUTHORIZED_KEY={root_key.public_line}",
            "-e", f"SSHD_USER_PASSWORD={password}",
            *docker_args,
            sshd_image,
        )  # fmt: skip
        started.append(name)
        wait_for_sshd(port)
        return SshdHost(name, port, fingerprint_of(host_key.public_line), root_key.private_file, password)

    yield start
    for name in started:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def stop_host(host: SshdHost) -> None:
    """Remove a host's container now, freeing its port for a replacement."""
    _docker("rm", "-f", host.container)


@pytest.fixture(scope="session")
def sshd_host(start_host) -> SshdHost:
    """One test host shared by the tests that do not replace it."""
    return start_host()


LAYERED_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
RUN mkdir -p /opt/t && head -c 400000 /dev/urandom > /opt/t/one.bin
RUN echo two > /opt/t/two.txt
COPY last.txt /opt/t/last.txt
"""


def _build(client, folder: Path, last: str, tag: str) -> None:
    folder.mkdir()
    (folder / "Dockerfile").write_text(LAYERED_DOCKERFILE, encoding="utf-8")
    (folder / "last.txt").write_text(last, encoding="utf-8")
    client.images.build(path=str(folder), tag=tag, rm=True, forcerm=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Tags of a small test image and of its variant with another last layer (what a one-line
    code change does to a trainer image); removed afterwards."""
    client = docker_client()
    suffix = secrets.token_hex(4)
    tags = {"first": f"runner-test/layers:{suffix}-a", "variant": f"runner-test/layers:{suffix}-b"}
    folder = tmp_path_factory.mktemp("layer-images")
    try:
        _build(client, folder / "first", "the first version\n", tags["first"])
        _build(client, folder / "variant", "a one-line change\n", tags["variant"])
        yield tags
    finally:
        for tag in tags.values():
            with contextlib.suppress(ImageNotFound):  # never built: nothing to remove
                client.images.remove(tag)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> LayerCache:
    """One laptop cache for the module: the base layer is extracted and compressed once."""
    return LayerCache(tmp_path_factory.mktemp("layer-cache"))


@pytest.fixture(scope="session")
def vm_host(root_key, tmp_path_factory):
    """The VM-like host (network namespace, sshd, its own dockerd), shared by the session."""
    from tests.remote.vm_host import start_vm_host

    try:
        host = start_vm_host(tmp_path_factory.mktemp("vm-host"), root_key)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield host
    host.stop()


class RegistryStorage:
    """A registry's storage folder for the session; images are pushed into it once each, through
    a loopback registry started for the push (the local engine trusts loopback registries)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "storage"
        self.path.mkdir()
        self._pushed: set[tuple[str, str]] = set()

    def push(self, image: str, repository: str) -> None:
        from tests.remote import registry_server

        if (image, repository) in self._pushed:
            return
        pusher = registry_server.start_local(self.folder, self.path)
        try:
            registry_server.push(image, pusher, repository)
        finally:
            pusher.stop()
        self._pushed.add((image, repository))


@pytest.fixture(scope="session")
def registry_storage(tmp_path_factory) -> RegistryStorage:
    from tests.remote import registry_server

    if not registry_server.available():
        pytest.fail("registry tests need docker-registry; run scripts/ensure-test-hosts")
    return RegistryStorage(tmp_path_factory.mktemp("registry"))
