"""The SSH provider: a host you already have, reached by SSH; power modes are no-ops.

There is no instance to create or boot, so the pipeline skips those phases; everything else
goes over one SSH session (runner.remote): the image's layers are synced into the host's layer
cache, then loaded into the host's Docker engine or unpacked into a root file system for proot
(the runtime: `docker`, `rootfs`, or `auto` for docker when the login can use an engine; see
runner.runtimes), the run's folders live under `<data_dir>/runner/runs/<run_id>/`, and each
step runs detached from the SSH session (runner.steps). Outputs
come back only as listed by a manifest the host writes (path, bytes, sha256), each download
verified against it; links and special files are refused, never followed.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from infra.base import (
    Capabilities,
    ContainerRun,
    FetchedFile,
    Guard,
    Instance,
    Lines,
    OutputSink,
    TransferProgress,
)
from runner import interrupts
from runner.errors import BadInput, ProviderFailure, RunFailed
from runner.remote import Endpoint, RemoteHost, check_remote_path

if TYPE_CHECKING:
    from runner.layer_sources import RegistrySource
    from runner.runtimes import Runtime
    from runner.spec import SshProvider as SshSettings
    from runner.spec import StepLimits
    from runner.steps import StepHandle
    from runner.store import Store


STEP_TIMEOUT_S = 14 * 24 * 3600  # a bound for the wait loop, far above any training run
OUT_ROOT = "/out"
MANIFEST_NAME = "outputs-manifest.json"

# Lists the declared outputs under the run's out folder ($1) without following any link, writes
# the listing to $2 (atomically) and prints it. Each further argument is a path relative to $1
# ("." for all of it). Links, special files and paths below a link are refused, not followed.
_MANIFEST_PY = """\
import hashlib, json, os, stat, sys
root, target, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
files, missing, refused, seen = [], [], [], set()

def digest(path):
    h, fd = hashlib.sha256(), os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()

def visit(rel):
    path = root if rel == "." else os.path.join(root, rel)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        refused.append({"path": rel, "why": "is a link"})
    elif stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(path)):
            visit(name if rel == "." else rel + "/" + name)
    elif not stat.S_ISREG(st.st_mode):
        refused.append({"path": rel, "why": "is not a regular file or folder"})
    elif rel not in seen:
        seen.add(rel)
        files.append({"path": rel, "bytes": st.st_size, "sha256": digest(path)})
    return True

def linked_parent(rel):
    current = root
    for part in [""] + rel.split("/")[:-1]:
        current = os.path.join(current, part) if part else current
        if os.path.islink(current):
            return True
    return False

for rel in wanted:
    if linked_parent(rel):
        refused.append({"path": rel, "why": "lies below a link"})
    elif not visit(rel):
        missing.append(rel)
text = json.dumps({"files": files, "missing": missing, "refused": refused})
with open(target + ".tmp", "w") as out:
    out.write(text)
os.replace(target + ".tmp", target)
print(text)
"""
# Removes a run folder; files a step made read-only are made writable first.
_REMOVE_SH = '[ -e "$1" ] || exit 0; chmod -R u+w -- "$1" 2>/dev/null; rm -rf -- "$1"'
_STEP_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
# What the watchdog may take from the host's environment: where its tools (docker, shutdown) are.
WATCHDOG_ENV = ("PATH", "DOCKER_HOST", "DOCKER_CONFIG")


class SshProvider:
    type = "ssh"
    capabilities = Capabilities(instances=False, power_modes=False)

    def __init__(self, settings: SshSettings, accept_new_host_key: bool = False) -> None:
        self.settings = settings
        self.accept_new_host_key = accept_new_host_key

    def open_host(self, run_id: str, instance: Instance | None = None) -> SshHost:
        """Log in (the password, if any, is read from its variable now) and make the run's folders."""
        settings = self.settings
        login = Login(settings.host, settings.port, settings.user, settings.key_path, settings.password_env)
        return open_ssh_host(
            run_id,
            login,
            login.endpoint(),
            settings.data_dir,
            settings.runtime,
            settings.limits,
            accept_new_host_key=self.accept_new_host_key,
        )


def open_ssh_host(
    run_id: str,
    login: Login,
    endpoint: Endpoint,
    data_dir: str,
    runtime: str,
    limits: StepLimits | None,
    *,
    accept_new_host_key: bool = False,
    power_off: tuple[str, ...] = (),
) -> SshHost:
    """Connect, pick the runtime and make the run's folders: the host for one run, on any machine
    reached by SSH (a host of the ssh provider, or a rented instance once it is up)."""
    from runner.runtimes import open_runtime
    from runner.store import open_store

    store = open_store()
    try:
        remote = RemoteHost(endpoint, store, accept_new_host_key=accept_new_host_key)
        chosen = open_runtime(remote, data_dir, runtime, limits)
        host = SshHost(run_id, remote, store, data_dir, chosen, login, power_off)
        host.make_folders()
    except BaseException:
        store.close()
        raise
    return host


@dataclass(frozen=True)
class Login:
    """How to reach the host again later, without any secret: the password stays in its variable."""

    host: str
    port: int
    user: str
    key_file: Path | None
    password_env: str | None

    def endpoint(self) -> Endpoint:
        """Where to log in now, the password (if any) read from its variable at this moment."""
        password = None
        if self.password_env is not None:
            password = os.environ.get(self.password_env)
            if password is None:
                raise BadInput(f"the SSH password variable {self.password_env} is not set")
        return Endpoint(self.host, self.port, self.user, self.key_file, password)

    def connect(self, store: Store, *, accept_new_host_key: bool = False) -> RemoteHost:
        return RemoteHost(self.endpoint(), store, accept_new_host_key=accept_new_host_key)

    def to_dict(self) -> dict:
        return {**asdict(self), "key_file": None if self.key_file is None else str(self.key_file)}

    @classmethod
    def from_dict(cls, data: dict) -> Login:
        key_file = Path(data["key_file"]) if data.get("key_file") else None
        return cls(data["host"], int(data["port"]), data["user"], key_file, data.get("password_env"))


class SshHost:
    """One run's folders and steps on an SSH host, in the runtime chosen for it."""

    def __init__(
        self,
        run_id: str,
        remote: RemoteHost,
        store: Store,
        data_dir: str,
        runtime: Runtime,
        login: Login,
        power_off: tuple[str, ...] = (),
    ) -> None:
        self.run_id = run_id
        self.power_off = power_off  # run on the host to end its billing (a rented instance's `shutdown`)
        self.remote = remote
        self.data_dir = data_dir
        self.run_dir = check_remote_path(f"{data_dir}/runner/runs/{run_id}")
        self.runtime = runtime
        self.login = login
        self._store = store
        self._left_running: StepHandle | None = None

    def make_folders(self) -> None:
        folders = [f"{self.run_dir}/{name}" for name in ("data", "job", "out")]
        result = self.remote.run(["mkdir", "-p", "-m", "700", "--", *folders], timeout=60)
        if result.exit_code != 0:
            raise ProviderFailure(f"cannot create {self.run_dir} on {self._where()}: {result.stderr.strip()}")

    def ensure_image(
        self,
        image_id: str,
        progress: TransferProgress | None = None,
        registry: RegistrySource | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        """Read the image's layers from the local engine; the runtime has the host fetch what a
        registry serves and sends the rest of what it lacks."""
        from runner.layers import image_layers

        report = self.runtime.prepare_image(image_layers(image_id), progress, registry, note)
        if note is not None:
            for line in report.notes:
                note(line)
            note(f"image ready on {self.login.host} ({self.runtime.name}): {report.summary()}")
        self._store.add_event(self.run_id, "image.synced", runtime=self.runtime.name, **report.to_dict())

    def put_input(self, src: Path, dest: str, progress: TransferProgress | None = None) -> str:
        return self.remote.put(src, f"{self.run_dir}/data/{dest}", _one(progress, f"input {dest}")).sha256

    def put_job_file(self, name: str, content: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "file"
            local.write_bytes(content)
            self.remote.put(local, f"{self.run_dir}/job/{name}")

    def run(self, request: ContainerRun, on_output: OutputSink) -> int:
        """Start the step detached (or reattach to it), stream its log lines until it ends;
        return its exit code.

        The step's folder is named after the step, so a resumed run finds a step an earlier
        session started: a running or finished one is reattached (its log shown from the
        start), never started twice; one lost with its host (no exit code, no supervisor) is
        moved aside and started anew. An interrupt here (Ctrl-C, the terminal closed) leaves the
        step running on the host: a training run must not die with the laptop's session. What
        a later `runner logs -f`, `runner stop` or `runner resume` needs to find it again is
        recorded as a `step.detached` event.
        """
        from runner.steps import StepState

        handle = self._started_before(request.name, on_output)
        if self._needs_watchdog(request.guard) and (
            handle is None or self.runtime.poll(handle).state is StepState.RUNNING
        ):
            self._start_watchdog(request.name, request.guard)
        lines = Lines(on_output)
        try:
            if handle is None:
                with interrupts.deferred(f"starting {request.name}"):
                    handle = self.runtime.start_step(
                        self.run_dir, _step_name(request.name), request.script, request.env, request.gpus
                    )
            code = self.runtime.wait(handle, STEP_TIMEOUT_S, lines.feed)
        except KeyboardInterrupt:
            if handle is None:  # interrupted before the step was started
                raise
            lines.flush()
            self._left_running = handle
            self._store.add_event(
                self.run_id,
                "step.detached",
                name=request.name,
                step_dir=handle.step_dir,
                pid=handle.pid,
                offset=lines.offset,
                runtime=self.runtime.name,
                data_dir=self.data_dir,
                login=self.login.to_dict(),
            )
            raise
        lines.flush()
        self._store.add_event(
            self.run_id, "step.exited", name=request.name, step_dir=handle.step_dir, exit_code=code
        )
        return code

    def step_ended(self, name: str) -> bool:
        """Whether the step was started (by any session) and has ended with an exit code."""
        from runner.steps import StepState, step_folder

        handle = self.runtime.find(step_folder(self.run_dir, _step_name(name)))
        return handle is not None and self.runtime.poll(handle).state is StepState.EXITED

    def stop_step(self, name: str, grace_s: float) -> int | None:
        """SIGTERM the step (SIGKILL after grace_s) if it runs; its exit code, None if never started."""
        from runner.steps import StepState, step_folder

        handle = self.runtime.find(step_folder(self.run_dir, _step_name(name)))
        if handle is None:
            return None
        if self.runtime.poll(handle).state is StepState.RUNNING:
            return self.runtime.stop(handle, grace_s=grace_s)
        return self.runtime.poll(handle).exit_code

    def _needs_watchdog(self, guard: Guard | None) -> bool:
        """A guarded step gets a watchdog where it has something to do: power a rented instance
        off, or (on any host) stop a stalled, over-budget or abandoned trainer."""
        if guard is None:
            return False
        return bool(self.power_off) or any((guard.stall_s, guard.heartbeat_s, guard.max_run_s))

    def _start_watchdog(self, step: str, guard: Guard) -> None:
        """Start the step's watchdog (remote_scripts/watchdog.py) unless one already guards it:
        it powers the host off (self.power_off) once the step ends, and stops a stuck step."""
        from runner.docker_runtime import DockerRuntime, container_name
        from runner.steps import StepState, step_folder

        watch_dir = step_folder(self.run_dir, "watchdog")
        running = self.runtime.find(watch_dir)
        if running is not None and self.runtime.poll(running).state is StepState.RUNNING:
            return
        if running is not None:
            self.runtime.set_aside(running)
        step_dir = step_folder(self.run_dir, _step_name(step))
        config = {
            "step_dir": step_dir,
            "metrics": f"{self.run_dir}/out/{posixpath.relpath(guard.metrics, OUT_ROOT)}",
            "stall_s": guard.stall_s,
            "heartbeat_s": guard.heartbeat_s,
            "grace_s": guard.grace_s,
            "interval_s": guard.interval_s,
            "max_run_s": guard.max_run_s,
            "container": container_name(step_dir) if isinstance(self.runtime, DockerRuntime) else None,
            "power_off": list(self.power_off) or None,
            "log": f"{self.run_dir}/watchdog.log",
        }
        script = self.runtime.ship("watchdog.py")
        self.runtime.put_json(f"{self.run_dir}/watchdog.json", config)
        self.runtime.launch(
            watch_dir, ["python3", script, f"{self.run_dir}/watchdog.json"], {}, inherit=WATCHDOG_ENV
        )

    def _started_before(self, name: str, on_output: OutputSink) -> StepHandle | None:
        """The step an earlier session started under this name, unless it was lost."""
        from runner.steps import StepState, step_folder

        handle = self.runtime.find(step_folder(self.run_dir, _step_name(name)))
        if handle is None:
            return None
        if self.runtime.poll(handle).state is StepState.LOST:
            kept = self.runtime.set_aside(handle)
            self.runtime.clean_up(self.run_dir)
            on_output(
                f"runner: {name} was lost with its host (no exit code); starting it again ({kept} kept)"
            )
            return None
        on_output(f"runner: reattached to {name}, started by an earlier runner process; its log so far:")
        return handle

    def fetch_outputs(
        self, outputs: tuple[str, ...], dest: Path, progress: TransferProgress | None = None
    ) -> list[FetchedFile]:
        """List the outputs on the host (manifest with sha256), check every path, download each
        file and verify it against the manifest."""
        listing = self._outputs_manifest(outputs)
        self._store.add_event(self.run_id, "outputs.listed", host=self._where(), **listing)
        files = _checked_files(listing)
        if listing["refused"]:
            first = listing["refused"][0]
            raise RunFailed(
                f"output {first['path']} {first['why']}; refusing to follow it"
                + (f" (and {len(listing['refused']) - 1} more)" if len(listing["refused"]) > 1 else "")
            )
        if listing["missing"]:
            missing = ", ".join(f"{OUT_ROOT}/{rel}".removesuffix("/.") for rel in listing["missing"])
            raise RunFailed(f"declared outputs were not written: {missing}")
        fetched: list[FetchedFile] = []
        for entry in files:
            target = dest / entry["path"]
            source = f"{self.run_dir}/out/{entry['path']}"
            transfer = self.remote.get(source, target, _one(progress, f"output {entry['path']}"))
            if transfer.sha256 != entry["sha256"] or transfer.size != entry["bytes"]:
                target.unlink(missing_ok=True)
                raise RunFailed(f"output {entry['path']} changed on {self._where()} after it was listed")
            fetched.append(FetchedFile(target, transfer.sha256, transfer.size))
        return fetched

    def fetch_host_log(self, name: str, dest: Path) -> bool:
        """Bring a log the host wrote in the run's folder (the watchdog's) to dest, if it exists."""
        path = check_remote_path(f"{self.run_dir}/{name}")
        if self.remote.run(["test", "-f", path]).exit_code != 0:
            return False
        self.remote.get(path, dest)
        return True

    def _outputs_manifest(self, outputs: tuple[str, ...]) -> dict:
        wanted = [posixpath.relpath(path, OUT_ROOT) for path in outputs]
        argv = ["python3", "-c", _MANIFEST_PY, f"{self.run_dir}/out", f"{self.run_dir}/{MANIFEST_NAME}"]
        result = self.remote.run(argv + wanted, timeout=3600)
        try:
            listing = json.loads(result.stdout) if result.exit_code == 0 else None
        except ValueError:
            listing = None
        if not isinstance(listing, dict) or not all(
            isinstance(listing.get(key), list) for key in ("files", "missing", "refused")
        ):
            detail = result.stderr.strip()[-500:] or result.stdout[:200]
            raise ProviderFailure(f"cannot list the outputs on {self._where()}: {detail}")
        return listing

    def close(self, *, keep_workspace: bool) -> None:
        """Remove the run's folder and leftovers, unless kept or a step was left running."""
        try:
            if self._left_running is not None:
                return
            self.runtime.clean_up(self.run_dir)
            if not keep_workspace:
                result = self.remote.run(["sh", "-c", _REMOVE_SH, "sh", self.run_dir], timeout=600)
                if result.exit_code != 0:
                    raise ProviderFailure(
                        f"cannot remove {self.run_dir} on {self._where()}: {result.stderr.strip()}"
                    )
        finally:
            self.remote.close()
            self._store.close()

    def _where(self) -> str:
        return self.remote.endpoint.address


def _one(progress: TransferProgress | None, what: str):
    """A (done, total) callback for RemoteHost.put/get that reports to progress as `what`."""
    return None if progress is None else (lambda done, total: progress(what, done, total))


def _step_name(name: str) -> str:
    """The step's folder name on the host: the same in every session, so a resume finds it."""
    return _STEP_CHARS.sub("-", name)[:64]


def _checked_files(listing: dict) -> list[dict]:
    """The manifest's files, each path checked here too: the host is not trusted to have done so
    (a listing it got wrong is the host's failure: exit code 3)."""
    seen: set[str] = set()
    files: list[dict] = []
    for entry in listing["files"]:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not _safe_relative(path):
            raise ProviderFailure(f"the host's outputs manifest names a path outside the outputs: {path!r}")
        if path in seen:
            raise ProviderFailure(f"the host's outputs manifest names {path!r} twice")
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ProviderFailure(f"the host's outputs manifest has no sha256 for {path!r}")
        if not isinstance(size, int) or size < 0:
            raise ProviderFailure(f"the host's outputs manifest has no size in bytes for {path!r}")
        seen.add(path)
        files.append(entry)
    return files


def _safe_relative(path: object) -> bool:
    """A relative path without '..', '.', empty parts or control characters."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))
