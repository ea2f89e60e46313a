"""Real registries for the tests: Debian's `docker-registry` (the CNCF distribution registry).

One storage folder, several servers over it: one on 127.0.0.1 that the local engine pushes to
(the engine trusts loopback registries over plain HTTP), and, for the test hosts to reach, one
inside the VM-like host's network namespace or one in a container on a network the test makes
for itself. Every server binds to one address the test chose; nothing listens elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

BINARY = "/usr/bin/docker-registry"
START_TIMEOUT_S = 30


@dataclass
class Registry:
    """A started registry; stop() ends it. host is what clients put in references."""

    host: str  # address:port
    folder: Path
    process: subprocess.Popen | None = None
    container: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.container is not None:
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, timeout=60)


def available() -> bool:
    return os.access(BINARY, os.X_OK)


def _config(folder: Path, storage: Path, addr: str, htpasswd: Path | None) -> Path:
    lines = [
        "version: 0.1",
        "log: {level: warn}",
        f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}",
        f"http: {{addr: '{addr}'}}",
    ]
    if htpasswd is not None:
        lines.append(f"auth: {{htpasswd: {{realm: test-realm, path: {htpasswd}}}}}")
    path = folder / f"config-{secrets.token_hex(3)}.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _htpasswd(folder: Path, user: str, password: str) -> Path:
    path = folder / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    path.write_text(f"{user}:{hashed}\n", encoding="utf-8")
    return path


def _auth(folder: Path, basic_auth: bool) -> tuple[str | None, str | None, Path | None]:
    """A user, a fresh password and their htpasswd file, or nothing without basic auth."""
    if not basic_auth:
        return None, None, None
    user, password = "tester", secrets.token_urlsafe(12)
    return user, password, _htpasswd(folder, user, password)


def start_local(
    folder: Path, storage: Path, *, basic_auth: bool = False, port: int | None = None
) -> Registry:
    """A registry on 127.0.0.1 (a free port unless given) over storage."""
    port = port or _free_port()
    user, password, htpasswd = _auth(folder, basic_auth)
    config = _config(folder, storage, f"127.0.0.1:{port}", htpasswd)
    return _spawn([BINARY, "serve", str(config)], f"127.0.0.1:{port}", folder, user, password)


def start_in_namespace(folder: Path, storage: Path, namespace: str, address: str) -> Registry:
    """A registry inside a network namespace the test made, on its address there."""
    port = 5000
    config = _config(folder, storage, f"{address}:{port}", None)
    argv = ["nsenter", f"--net=/run/netns/{namespace}", BINARY, "serve", str(config)]
    return _spawn(argv, f"{address}:{port}", folder)


def start_in_container(
    folder: Path, storage: Path, network: str, image: str, *, basic_auth: bool = False
) -> Registry:
    """A registry in a container on the test's own Docker network (the binary bind-mounted)."""
    name = f"runner-registry-{secrets.token_hex(4)}"
    user, password, htpasswd = _auth(folder, basic_auth)
    inside = Path("/etc/registry-htpasswd") if htpasswd else None
    config = _config(folder, Path("/var/lib/registry"), ":5000", inside)
    mounts = ["-v", f"{htpasswd}:{inside}:ro"] if htpasswd else []
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", network,
         "-v", f"{BINARY}:{BINARY}:ro", "-v", f"{storage}:/var/lib/registry:ro", *mounts,
         "-v", f"{config}:/etc/registry.yml:ro", image, BINARY, "serve", "/etc/registry.yml"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    address = subprocess.run(
        ["docker", "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}', name],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    registry = Registry(f"{address}:5000", folder, container=name, user=user, password=password)
    _wait(registry)
    return registry


@contextlib.contextmanager
def container_registry(
    container: str, storage: Path, folder: Path, image: str, *, basic_auth: bool = False
) -> Iterator[Registry]:
    """A Docker network of the test's own with a registry on it, the host container joined."""
    network = f"runner-reg-{secrets.token_hex(4)}"
    subprocess.run(["docker", "network", "create", network], check=True, capture_output=True, timeout=60)
    registry = None
    try:
        subprocess.run(
            ["docker", "network", "connect", network, container], check=True, capture_output=True, timeout=60
        )
        registry = start_in_container(folder, storage, network, image, basic_auth=basic_auth)
        yield registry
    finally:
        if registry is not None:
            registry.stop()
        subprocess.run(
            ["docker", "network", "disconnect", "-f", network, container], capture_output=True, timeout=60
        )
        subprocess.run(["docker", "network", "rm", network], capture_output=True, timeout=60)


def _spawn(
    argv: list[str], host: str, folder: Path, user: str | None = None, password: str | None = None
) -> Registry:
    log = (folder / f"registry-{host.replace(':', '-')}.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    registry = Registry(host, folder, process=process, user=user, password=password)
    try:
        _wait(registry)
    except BaseException:
        registry.stop()
        raise
    return registry


def _wait(registry: Registry) -> None:
    address, port = registry.host.rsplit(":", 1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, int(port)), timeout=1):
            return
        if registry.process is not None and registry.process.poll() is not None:
            raise RuntimeError(f"docker-registry on {registry.host} exited: see {registry.folder}")
        time.sleep(0.2)
    raise RuntimeError(f"docker-registry on {registry.host} did not answer within {START_TIMEOUT_S}s")


def push(image: str, registry: Registry, repository: str) -> str:
    """Push a local image to registry (loopback) as repository; the reference pushed."""
    ref = f"{registry.host}/{repository}"
    for argv in (["docker", "tag", image, ref], ["docker", "push", ref]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    # untag, and drop the digest the push recorded: the engine must not remember a registry
    # that is gone once the test ends (runner would try it for a base built on this image)
    digests = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{json .RepoDigests}}", image], capture_output=True, text=True
    ).stdout
    ours = [d for d in json.loads(digests or "[]") if d.startswith(f"{registry.host}/")]
    subprocess.run(["docker", "rmi", ref, *ours], capture_output=True, timeout=60)
    return ref


def blob_path(storage: Path, digest: str) -> Path:
    """Where the registry keeps a blob (to corrupt it, in fault tests)."""
    hexa = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


def copy_storage(storage: Path, target: Path) -> Path:
    shutil.copytree(storage, target, symlinks=True)
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
