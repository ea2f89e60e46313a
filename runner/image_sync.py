"""`runner image sync`: put a job's image on an SSH host ahead of a run, and say what it cost.

Why a command of its own: the first sync of a multi-GB image is the slow part of a first run
on a rented host, so users want to do it before the clock matters (or to check what a run
would send), and a sync that must send nothing should prove it. It goes through exactly what
`submit` uses (the host's runtime's prepare_image: only the layers the host lacks are sent,
then loaded into its engine or unpacked into a rootfs), so a later run finds the image ready,
and then it checks, on the host, that the image there has the laptop's image ID.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from runner.errors import BadInput, NotFound
from runner.images import ResolvedImage
from runner.layer_sources import RegistrySource
from runner.layers import SyncReport
from runner.progress import Progress
from runner.remote import Endpoint, RemoteHost
from runner.spec import LoadedSpec
from runner.steps import absolute_folder
from runner.store import Store

DEFAULT_DATA_DIR = "/root/runner-data"  # as runner.spec.SshProvider
SPEC_SUFFIXES = (".yaml", ".yml")
# the same rules as runner.spec's HostName and UserName
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.:-]{0,252}[A-Za-z0-9])?")
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_HOST_PORT = re.compile(r"\[(?P<v6>[^\]]+)\](:(?P<v6port>[^:]*))?|(?P<name>[^:]+)(:(?P<port>[^:]*))?")


@dataclass(frozen=True)
class Options:
    """What the command line said; None means "the job's value, else the default"."""

    host: str | None = None
    key: Path | None = None
    password_env: str | None = None
    data_dir: str | None = None
    runtime: str | None = None
    accept_new_host_key: bool = False


@dataclass(frozen=True)
class Target:
    """The host to sync to, how to log in, where its data disk is and which runtime to use."""

    endpoint: Endpoint
    data_dir: str
    runtime: str

    @property
    def host(self) -> str:
        return f"{self.endpoint.user}@{self.endpoint.address}"


@dataclass(frozen=True)
class SyncResult:
    report: SyncReport
    runtime: str
    host: str

    def to_dict(self) -> dict:
        return {**self.report.to_dict(), "runtime": self.runtime, "host": self.host}

    def summary(self) -> str:
        return f"{self.host} ({self.runtime}): {self.report.summary()}; image {self.report.image_id} verified"


def parse_host(text: str) -> tuple[str | None, str, int | None]:
    """`[USER@]HOST[:PORT]` (an IPv6 address bare, or in brackets with a port) as its parts."""
    user, at, rest = text.rpartition("@")
    if rest.count(":") > 1 and not rest.startswith("["):
        host, port = rest, None  # a bare IPv6 address
    else:
        match = _HOST_PORT.fullmatch(rest)
        if match is None:
            raise BadInput(f"--host must be [USER@]HOST[:PORT], got {text!r}")
        host = match["v6"] or match["name"]
        port = match["v6port"] if match["v6"] else match["port"]
    if at and not _USER.fullmatch(user):
        raise BadInput(f"--host: bad user name {user!r} (like root)")
    if not _HOST.fullmatch(host or ""):
        raise BadInput(f"--host: bad host name or address {host!r}")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise BadInput(f"--host: port must be a number from 1 to 65535, got {port!r}")
    return (user if at else None), host, (int(port) if port is not None else None)


def is_job_spec(argument: str) -> bool:
    """A job spec is an existing .yaml/.yml file; anything else names an image."""
    path = Path(argument)
    return path.suffix.lower() in SPEC_SUFFIXES and path.is_file()


def resolve_target(options: Options, provider: object | None = None, what: str = "") -> Target:
    """The target from the options, filling in from the job's ssh provider (when it has one).

    --host replaces the job's host, user and port as a whole; --key or --password-env replace
    its login. A non-ssh job, or an image, needs --host.
    """
    ssh = provider if getattr(provider, "type", None) == "ssh" else None
    if options.host is not None:
        user, host, port = parse_host(options.host)
        user, port = user or "root", port or 22
    elif ssh is not None:
        user, host, port = ssh.user, ssh.host, ssh.port
    else:
        kind = f" (its provider is {provider.type})" if provider is not None else ""
        raise BadInput(f"no host to sync {what} to{kind}: give --host [USER@]HOST[:PORT]")
    key, password_env = options.key, options.password_env
    if key is None and password_env is None and ssh is not None:
        key, password_env = ssh.key_path, ssh.password_env
    if key is not None and not key.is_file():
        raise BadInput(f"SSH key file not found: {key}")
    if key is None and password_env is None:
        raise BadInput(f"no way to log in to {host}: give --key FILE or --password-env NAME")
    from infra.ssh import Login

    endpoint = Login(host, port, user, key, password_env).endpoint()
    data_dir = options.data_dir or (ssh.data_dir if ssh else DEFAULT_DATA_DIR)
    runtime = options.runtime or (ssh.runtime if ssh else "auto")
    return Target(endpoint, absolute_folder(data_dir), runtime)


def plan(
    argument: str, options: Options, notice: Callable[[str], None]
) -> tuple[str, Target, RegistrySource | None]:
    """The local image ID to sync, where to, and (for a job) the registry its host may fetch
    the base layers from, from a job spec path or an image reference.

    The target is checked before a job's image is built, so a bad option fails at once."""
    if not is_job_spec(argument):
        target = resolve_target(options, None, f"image {argument}")
        return local_image_id(argument), target, None
    from runner.images import resolve_image
    from runner.spec import load_spec

    loaded = load_spec(argument)
    target = resolve_target(options, loaded.spec.provider, f"job {loaded.spec.name}")
    if loaded.spec.image.build is not None:
        notice(f"building the image of job {loaded.spec.name}")
    resolved = resolve_image(loaded, lambda line: None)
    registry = job_registry(loaded, resolved, notice)
    return resolved.image.id, target, registry


def job_registry(
    loaded: LoadedSpec, resolved: ResolvedImage, notice: Callable[[str], None]
) -> RegistrySource | None:
    """Where the job's base layers can be fetched from (None: the laptop sends them all)."""
    from runner.layer_sources import resolve_source

    return resolve_source(loaded.spec.image, resolved.base, loaded.spec.provider.type, notice)


def layer_plan(argument: str, notice: Callable[[str], None]) -> dict:
    """`runner image plan JOB`: each layer of the job's image, its size and where it would
    come from (a registry or the laptop), before anything moves."""
    from runner.images import resolve_image
    from runner.layer_sources import SOURCE_LAPTOP, plan_layers
    from runner.layers import image_layers
    from runner.spec import load_spec

    loaded = load_spec(argument)
    if loaded.spec.image.build is not None:
        notice(f"building the image of job {loaded.spec.name}")
    resolved = resolve_image(loaded, lambda line: None)
    registry = job_registry(loaded, resolved, notice)
    layers = image_layers(resolved.image.id)
    planned = plan_layers(layers.diff_ids, layers.sizes, registry, set())
    laptop = [p for p in planned if p.source == SOURCE_LAPTOP]
    return {
        "job": loaded.spec.name,
        "image_id": resolved.image.id,
        "registry": registry.to_lock() if registry is not None else None,
        "layers": [p.to_dict() for p in planned],
        "laptop_bytes": sum(p.size for p in laptop),
        "registry_bytes": sum(p.fetch_bytes for p in planned if p.source != SOURCE_LAPTOP),
        "image_bytes": sum(p.size for p in planned),
    }


def plan_lines(plan: dict) -> list[str]:
    """The plan as a table and a closing line, for the terminal."""
    rows = [f"{'LAYER':<14}{'SIZE':>12}  {'SOURCE':<24}{'BLOB':>12}"]
    for layer in plan["layers"]:
        blob = _mb(layer["fetch_bytes"]) if layer["fetch_bytes"] else "-"
        short = layer["diff_id"].removeprefix("sha256:")[:12]
        rows.append(f"{short:<14}{_mb(layer['size']):>12}  {layer['source']:<24}{blob:>12}")
    share = 100 * plan["laptop_bytes"] / plan["image_bytes"] if plan["image_bytes"] else 0
    rows.append(
        f"the laptop sends {_mb(plan['laptop_bytes'])} ({share:.1f}% of the image, before compression);"
        f" the instance fetches {_mb(plan['registry_bytes'])} from a registry;"
        " layers already on the instance are skipped at sync"
    )
    return rows


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def local_image_id(image: str) -> str:
    """The ID of an image in the local engine (NotFound when it has none by that name)."""
    from docker.errors import ImageNotFound

    from runner.images import docker_client, engine_errors

    try:
        with engine_errors(f"inspecting {image}"):
            return docker_client().api.inspect_image(image)["Id"]
    except ImageNotFound:
        raise NotFound(f"image {image} is not in the local Docker engine") from None


def sync_image(
    image_id: str,
    target: Target,
    store: Store,
    *,
    accept_new_host_key: bool = False,
    progress: Progress | None = None,
    registry: RegistrySource | None = None,
) -> SyncResult:
    """Send what the host lacks of the image, load or unpack it there, and verify its ID.

    The report's seconds are the wall time from connecting to the verified image."""
    from runner.layers import image_layers
    from runner.runtimes import open_runtime

    started = time.monotonic()
    note = progress.note if progress is not None else (lambda text: None)
    with RemoteHost(target.endpoint, store, accept_new_host_key=accept_new_host_key) as host:
        runtime = open_runtime(host, target.data_dir, target.runtime)
        note(f"reading the layers of {image_id} from the local engine")
        layers = image_layers(image_id)
        note(f"syncing to {target.host} ({runtime.name} runtime, data in {target.data_dir})")
        report = runtime.prepare_image(layers, progress, registry, note)  # checks the image ID on the host
        for line in report.notes:
            note(line)
    report = replace(report, seconds=round(time.monotonic() - started, 3))
    return SyncResult(report, runtime.name, target.host)
