"""The contract between the run pipeline and the places a job can run.

A Provider owns the machine's lifecycle (what costs money); a Host runs the job's
containers on that machine once it is up. The pipeline only speaks these two interfaces,
so adding a cloud never touches the phase order. Typed records cross the boundary, not
dicts, and every provider declares up front what it can do, so unsupported phases are
skipped visibly instead of failing half-way.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from infra.instances import BootPolicy
    from runner.layer_sources import RegistrySource

OutputSink = Callable[[str], None]
TransferProgress = Callable[[str, int, int], None]  # (what, bytes done, bytes total) of one transfer


class Lines:
    """Re-cut a byte stream into text lines for an OutputSink (log chunks do not follow line
    ends); offset counts the bytes fed, which is where a later reader of the same log picks up."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self._pending = b""
        self.offset = 0

    def feed(self, chunk: bytes) -> None:
        self.offset += len(chunk)
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._sink(line.decode("utf-8", errors="replace").rstrip("\r"))

    def flush(self) -> None:
        if self._pending:
            self._sink(self._pending.decode("utf-8", errors="replace"))
            self._pending = b""


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; the pipeline skips phases a provider has no use for."""

    instances: bool
    """True when there is a machine to create, boot and stop (False: runs right here)."""
    power_modes: bool
    """True when the machine can boot without its GPU for cheap set-up work."""
    ships_image: bool = True
    """True when the image travels to another machine (False: the local engine has it)."""


@dataclass(frozen=True)
class Guard:
    """What the on-host watchdog of a training step does (runner/remote_scripts/watchdog.py);
    the `watchdog` section of the spec, plus where the trainer writes its metrics."""

    metrics: str  # a path under /out
    stall_s: float | None
    heartbeat_s: float | None
    grace_s: float
    interval_s: float
    max_run_s: float | None = None  # the budget left, in seconds of this step


@dataclass(frozen=True)
class ContainerRun:
    """One command to run in the job's image, with the standard mounts (/data, /job, /out)."""

    name: str
    image_id: str
    script: str
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    guard: Guard | None = None  # hosts that can run a watchdog next to the step start one


@dataclass(frozen=True)
class FetchedFile:
    """A file brought back from /out, with the sha256 and size measured while it was written."""

    path: Path
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Workspace:
    """The run's folders as the Host sees them: mounted at /data, /job and /out."""

    data: Path
    job: Path
    out: Path


class Host(Protocol):
    """Where one run's containers execute."""

    def ensure_image(
        self,
        image_id: str,
        progress: TransferProgress | None = None,
        registry: RegistrySource | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        """Make the image available to this host, or raise ProviderFailure. registry names where
        the host may fetch public layers itself; note takes one-line messages for the user."""

    def put_input(self, src: Path, dest: str, progress: TransferProgress | None = None) -> str:
        """Place a local file at /data/<dest> (dest already validated as relative and inside);
        return the sha256 of what was placed, so a file changed since planning is caught."""

    def put_job_file(self, name: str, content: bytes) -> None:
        """Place a small file at /job/<name> (the spec, its resolved form)."""

    def run(self, request: ContainerRun, on_output: OutputSink) -> int:
        """Run the command to completion, streaming its output lines; return its exit code."""

    def step_ended(self, name: str) -> bool:
        """Whether the step named was started (by any session) and has ended."""

    def fetch_outputs(
        self, outputs: tuple[str, ...], dest: Path, progress: TransferProgress | None = None
    ) -> list[FetchedFile]:
        """Copy the given /out paths (files or folders) under dest; return the local files with
        the sha256 of what was written (so nobody has to read them again).

        Raises RunFailed when a declared output is missing, and refuses anything that is
        not a regular file inside /out (symlinks, devices)."""

    def fetch_host_log(self, name: str, dest: Path) -> bool:
        """Copy a log the host itself wrote for the run (the watchdog's) to dest; False if none."""

    def close(self, *, keep_workspace: bool) -> None:
        """Stop and remove anything left running; drop the workspace unless asked to keep it."""


class Provider(Protocol):
    """A place to run jobs. Providers with instances (capabilities.instances) also have the
    members of InstanceProvider."""

    type: str
    capabilities: Capabilities

    def open_host(self, run_id: str, instance: Instance | None = None) -> Host:
        """The host for this run: for local and ssh providers the one machine there is, for the
        others the given running instance."""


# -- rented instances ------------------------------------------------------------------


class PowerMode(str, enum.Enum):
    """How an instance boots: without its GPU (cheap, for set-up) or with it (for training)."""

    CPU = "cpu"
    GPU = "gpu"


class InstanceState(str, enum.Enum):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    RELEASED = "released"
    FAILED = "failed"


@dataclass(frozen=True)
class SshAccess:
    """How to log in to a running instance; on AutoDL host, port and password may change
    after every power cycle, so this is read again after each boot."""

    host: str
    port: int
    user: str = "root"
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Instance:
    """What describe() tells: state, the mode it runs in, how to reach it, what each mode costs."""

    id: str
    state: InstanceState
    mode: PowerMode | None = None  # None unless running or starting
    ssh: SshAccess | None = None  # None unless running
    price_per_hour: dict[PowerMode, float] = field(default_factory=dict)
    currency: str = "CNY"
    name: str = ""
    stopped_at: float | None = None  # when the provider saw it stop (epoch s), where it reports that


class InstanceApi(Protocol):
    """A cloud's instance lifecycle, as the pipeline needs it. Methods raise the typed errors of
    runner.errors (NoCapacity, AuthFailed, InsufficientBalance, InstanceNotFound, Transient;
    ProviderFailure with the provider's own message otherwise)."""

    def create(self, name: str) -> Instance:
        """A new instance, powered off or on as the cloud creates it."""

    def describe(self, instance_id: str) -> Instance: ...

    def power_on(self, instance_id: str, mode: PowerMode) -> None:
        """Ask for a boot in mode; returns once the request is accepted (poll describe)."""

    def power_off(self, instance_id: str) -> None: ...

    def release(self, instance_id: str) -> None:
        """Delete the instance and its disks (it must be powered off)."""

    def balance(self) -> float | None:
        """The account's balance in the instance's currency, None where the cloud has none."""


class InstanceProvider(Provider, Protocol):
    api: InstanceApi
    boot_policy: BootPolicy

    def instance_for(self, run_id: str) -> tuple[str, bool]:
        """The instance the run uses, and whether it was created for it."""
