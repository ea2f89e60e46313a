"""The local provider: this machine's Docker engine, no instance and no SSH.

It is the embedded default, so a first `runner submit` works before any cloud account
exists, and it exercises the same pipeline as the rented providers. Containers run as the
invoking user so the files they write in /out belong to that user.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from infra.base import (
    Capabilities,
    ContainerRun,
    FetchedFile,
    Instance,
    Lines,
    OutputSink,
    TransferProgress,
    Workspace,
)
from runner.errors import ProviderFailure, RunFailed
from runner.home import private_dir, runner_home
from runner.images import docker_client, engine_errors

LABEL = "dev.runner.run-id"
STEP_LABEL = "dev.runner.step"
STOP_GRACE_S = 30


class LocalProvider:
    type = "local"
    capabilities = Capabilities(instances=False, power_modes=False, ships_image=False)

    def open_host(self, run_id: str, instance: Instance | None = None) -> LocalHost:
        root = private_dir(private_dir(runner_home() / "work") / run_id)
        workspace = Workspace(data=root / "data", job=root / "job", out=root / "out")
        for folder in (workspace.data, workspace.job, workspace.out):
            folder.mkdir(exist_ok=True)
        return LocalHost(run_id, root, workspace)


class LocalHost:
    def __init__(self, run_id: str, root: Path, workspace: Workspace) -> None:

        self.run_id = run_id
        self.root = root
        self.workspace = workspace
        self._client = docker_client()

    def ensure_image(
        self, image_id: str, progress: TransferProgress | None = None, registry=None, note=None
    ) -> None:
        """The image is in this engine already: only checked (nothing to transfer)."""
        from docker.errors import ImageNotFound

        try:
            with engine_errors("checking the image"):
                self._client.images.get(image_id)
        except ImageNotFound:
            raise ProviderFailure(f"image {image_id} vanished from the local engine") from None

    def put_input(self, src: Path, dest: str, progress: TransferProgress | None = None) -> str:
        from runner.files import copy_hashed

        target = self.workspace.data / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, _ = copy_hashed(src, target)
        return digest

    def put_job_file(self, name: str, content: bytes) -> None:
        (self.workspace.job / name).write_bytes(content)

    def run(self, request: ContainerRun, on_output: OutputSink) -> int:
        """Run the step's container (or reattach to the one an earlier, killed controller left
        running or exited, so a resumed run never starts a step twice) and follow its output."""
        container = self._started_before(request.name)
        if container is None:
            container = self._start(request)
        else:
            on_output(
                f"runner: reattached to {request.name}, started by an earlier runner process; its log so far:"
            )
        try:
            with engine_errors(f"following {request.name}"):
                lines = Lines(on_output)
                for chunk in container.logs(stream=True, follow=True):
                    lines.feed(chunk)
                lines.flush()
                return int(container.wait()["StatusCode"])
        finally:
            _dispose(container, request.name)

    def step_ended(self, name: str) -> bool:
        container = self._started_before(name)
        return container is not None and container.status == "exited"

    def _started_before(self, name: str):
        with engine_errors(f"looking for {name}"):
            labels = [f"{LABEL}={self.run_id}", f"{STEP_LABEL}={name}"]
            found = self._client.containers.list(all=True, filters={"label": labels})
        return found[0] if found else None

    def _start(self, request: ContainerRun):
        from docker.types import DeviceRequest

        devices = [DeviceRequest(count=request.gpus, capabilities=[["gpu"]])] if request.gpus else None
        with engine_errors(f"starting {request.name}"):
            return self._client.containers.run(
                request.image_id,
                command=["sh", "-c", request.script],
                environment={"HOME": "/tmp", **request.env},
                volumes={
                    str(self.workspace.data): {"bind": "/data", "mode": "rw"},
                    str(self.workspace.job): {"bind": "/job", "mode": "ro"},
                    str(self.workspace.out): {"bind": "/out", "mode": "rw"},
                },
                working_dir="/data",
                user=f"{os.getuid()}:{os.getgid()}",
                labels={LABEL: self.run_id, STEP_LABEL: request.name},
                device_requests=devices,
                init=True,  # an init process forwards SIGTERM to the command, so it can checkpoint
                detach=True,
            )

    def fetch_outputs(
        self, outputs: tuple[str, ...], dest: Path, progress: TransferProgress | None = None
    ) -> list[FetchedFile]:
        from runner.files import copy_hashed

        out_root = self.workspace.out.resolve()
        copied: list[FetchedFile] = []
        missing: list[str] = []
        for output in outputs:
            source = out_root / output.removeprefix("/out").lstrip("/")
            if not source.exists() and not source.is_symlink():
                missing.append(output)
                continue
            for file in _regular_files(source, out_root):
                target = dest / file.relative_to(out_root)
                copied.append(FetchedFile(target, *copy_hashed(file, target)))
        if missing:
            raise RunFailed(f"declared outputs were not written: {', '.join(missing)}")
        return copied

    def fetch_host_log(self, name: str, dest: Path) -> bool:
        return False  # nothing runs next to the steps on this machine

    def close(self, *, keep_workspace: bool) -> None:
        with engine_errors("removing the run's containers"):
            left = self._client.containers.list(all=True, filters={"label": f"{LABEL}={self.run_id}"})
            for container in left:
                container.remove(force=True)
        self._client.close()
        if not keep_workspace:
            shutil.rmtree(self.root, ignore_errors=True)


def _dispose(container, name: str) -> None:
    """Stop and remove a step's container. On an interrupt its command is still running: it gets
    SIGTERM first (time to checkpoint), SIGKILL after the grace period."""
    from docker.errors import NotFound

    try:
        with engine_errors(f"stopping {name}"):
            container.stop(timeout=STOP_GRACE_S)
            container.remove(force=True)
    except NotFound:
        pass  # already gone


def _regular_files(path: Path, root: Path) -> list[Path]:
    """The regular files at or under path, refusing links and anything outside root."""
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        raise RunFailed(f"output {path.relative_to(root)} is a link; refusing to follow it")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RunFailed(f"output {path.relative_to(root)} is not a regular file or folder")
    files: list[Path] = []
    for child in sorted(path.iterdir()):
        files.extend(_regular_files(child, root))
    return files
