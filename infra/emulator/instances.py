"""Docker containers playing AutoDL instances: create, boot in a mode, stop, remove.

An AutoDL instance is itself a container with no Docker inside, whose disks survive a
power cycle; so an emulated instance is one long-lived container that is stopped and
started, never recreated. Before each boot the emulator copies the boot settings (mode,
and on the first boot the root password) into the stopped container and sets its CPU
quota (a no-GPU boot gets a fraction of a core, as on AutoDL). sshd is published on an
ephemeral 127.0.0.1 port chosen by Docker at each start; nothing listens elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from runner.errors import ProviderFailure

DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "emulator-instance.Dockerfile"
LABEL = "runner.emulator.home"


def image_tag() -> str:
    """The instance image's tag: a hash of the Dockerfile, so an edit builds a new image."""
    return "runner-emulator/instance:" + hashlib.sha256(DOCKERFILE.read_bytes()).hexdigest()[:12]


def docker(*args: str, timeout: float = 60, stdin: bytes | None = None) -> str:
    try:
        proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProviderFailure(f"docker {args[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise ProviderFailure(f"docker {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace").strip()


def image_exists(tag: str) -> bool:
    inspect = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=60)
    return inspect.returncode == 0


def ensure_image(base: str | None = None, timeout: float = 900) -> str:
    """Build the instance image unless this version of it exists; return its tag."""
    tag = image_tag()
    if not image_exists(tag):
        args = ["build", "-q", "-t", tag, "-f", str(DOCKERFILE)]
        if base:
            args += ["--build-arg", f"BASE={base}"]
        docker(*args, str(DOCKERFILE.parent), timeout=timeout)
    return tag


def create(name: str, image: str, home: Path, password: str) -> None:
    """A stopped container with its root password waiting for the first boot."""
    docker("create", "--name", name, "--hostname", "autodl-container", "--label", f"{LABEL}={home}",
           "-p", "127.0.0.1::22", image)  # fmt: skip
    _copy_boot_files(name, {"root_password": password})


def boot(name: str, mode: str, cpus: float, memory: str | None) -> int:
    """Start a stopped container in `mode`; return the 127.0.0.1 port Docker gave its sshd."""
    _copy_boot_files(name, {"mode": mode})
    limits = ["--cpus", str(cpus if mode == "non_gpu" else float(os.cpu_count() or 1))]
    if memory:
        full = str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        size = memory if mode == "non_gpu" else full
        limits += ["--memory", size, "--memory-swap", "-1"]
    docker("update", *limits, name)
    docker("start", name)
    published = docker("port", name, "22/tcp").splitlines()[0]
    return int(published.rsplit(":", 1)[1])


def stop(name: str) -> None:
    docker("stop", "-t", "5", name, timeout=60)


def remove(name: str) -> None:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def running(home: Path) -> set[str]:
    """The containers of this emulator home that are running now (one `docker ps` call)."""
    return set(docker("ps", "--format", "{{.Names}}", "--filter", f"label={LABEL}={home}").split())


def containers_of(home: Path) -> list[str]:
    """Every container this emulator home created (running or not)."""
    out = docker("ps", "-a", "--format", "{{.Names}}", "--filter", f"label={LABEL}={home}")
    return out.split()


def _copy_boot_files(name: str, files: dict[str, str]) -> None:
    """Put files under /etc/autodl-boot/ in the (stopped) container, in one `docker cp`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for file_name, text in files.items():
            data = (text + "\n").encode()
            info = tarfile.TarInfo(f"autodl-boot/{file_name}")
            info.size, info.mode = len(data), 0o600
            archive.addfile(info, io.BytesIO(data))
    docker("cp", "-", f"{name}:/etc", stdin=buffer.getvalue())
