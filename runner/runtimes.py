"""How a job's container runs on a rented host that has no Docker: the `rootfs` runtime.

AutoDL-style instances are containers themselves, so the image's layers are unpacked into a
root file system cached on the data disk by image ID, and each step runs in it under `proot`
(ptrace, no privileges), detached from the SSH session (runner.steps). The host needs only
POSIX sh, coreutils, python3 and proot; the helpers it runs are shipped as files, and every
value from the caller reaches it as a quoted argument or inside a JSON file, never as shell text.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Protocol

from runner.errors import BadInput, ProviderFailure
from runner.layers import (
    ImageLayers,
    LayerProgress,
    RemoteLayout,
    SyncReport,
    digest_hex,
    sync_layers,
)
from runner.remote import RemoteHost
from runner.steps import DetachedSteps, StepHandle, StepStatus, absolute_folder, step_folder

if TYPE_CHECKING:
    from runner.layer_sources import RegistrySource
    from runner.spec import StepLimits

log = logging.getLogger(__name__)

MARKER = ".runner-unpacked.json"  # written by unpack_layers.py once every layer applied
GUEST_NVIDIA_LIBS = "/usr/local/nvidia/lib64"  # where NVIDIA's CUDA images look for the driver
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DRIVER_LIB = re.compile(r"lib(cuda|nvidia-[A-Za-z0-9_.-]+)\.so(\.[0-9.]+)?")

# Removes "$1" and any "$1.tmp-*" left by an interrupted unpack; folders may be read-only.
_REMOVE_SH = (
    'for d in "$1" "$1".tmp-*; do [ -e "$d" ] || continue; '
    'chmod -R u+w -- "$d" && rm -rf -- "$d" || exit 1; done'
)
# Prints what the GPU binds are computed from (see gpu_binds), and where proot is.
_PROBE_SH = """PATH=$PATH:/sbin:/usr/sbin
command -v proot | while IFS= read -r l; do echo "proot $l"; done
for f in /dev/nvidia*; do [ -e "$f" ] && echo "dev $f"; done
ldconfig -p 2>/dev/null | while IFS= read -r l; do echo "ld $l"; done
for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64; do
  for f in "$d"/libcuda.so* "$d"/libnvidia-*.so*; do [ -e "$f" ] && echo "file $f"; done
done
exit 0"""
# Installs proot with apt-get, as root or through password-less sudo; says why it cannot.
_INSTALL_PROOT_SH = """if [ "$(id -u)" = 0 ]; then run=; elif sudo -n true 2>/dev/null; then run="sudo -n"
else echo "not root, and sudo needs a password" >&2; exit 3; fi
command -v apt-get >/dev/null 2>&1 || { echo "no apt-get on the host" >&2; exit 3; }
export DEBIAN_FRONTEND=noninteractive
$run apt-get update -qq >/dev/null && $run apt-get install -y -qq --no-install-recommends proot >/dev/null"""


@dataclass(frozen=True)
class GpuBinds:
    """What proot needs for the host's GPUs to work inside the rootfs."""

    proot_args: tuple[str, ...] = ()
    library_dir: str | None = None  # to put first on LD_LIBRARY_PATH inside


class Runtime(Protocol):
    """What the SSH host needs from a runtime; steps are watched through DetachedSteps."""

    name: str

    def prepare_image(
        self,
        layers: ImageLayers,
        progress: LayerProgress | None = None,
        registry: RegistrySource | None = None,
        note: Callable[[str], None] | None = None,
    ) -> SyncReport:
        """Send what the host lacks of the image and make it runnable there."""

    def start_step(
        self, run_dir_remote: str, step_name: str, script: str, env: Mapping[str, str], gpus: int
    ) -> StepHandle:
        """Start one step of the prepared image, detached."""

    def find(self, step_dir: str) -> StepHandle | None:
        """The step started in step_dir by an earlier session, or None."""

    def launch(
        self, step_dir: str, argv: Sequence[str], env: Mapping[str, str], inherit: Sequence[str] = ()
    ) -> StepHandle:
        """Start a host command (not in the image) detached, like a step."""

    def ship(self, script: str) -> str:
        """A helper script put in the host's runner/bin; its remote path."""

    def put_json(self, remote: str, value: object) -> None: ...

    def set_aside(self, handle: StepHandle) -> str: ...

    def poll(self, handle: StepHandle) -> StepStatus: ...

    def wait(self, handle: StepHandle, timeout: float, on_output=None, offset: int = 0) -> int: ...

    def stop(self, handle: StepHandle, grace_s: float = 30.0) -> int: ...

    def clean_up(self, run_dir_remote: str) -> None:
        """Remove what the run's steps left on the host besides its folder."""


def open_runtime(host: RemoteHost, data_dir: str, wanted: str, limits: StepLimits | None = None) -> Runtime:
    """The runtime to use: docker when asked or, for `auto`, when the login can use an engine;
    rootfs otherwise. Asking for docker on a host without a usable engine is an error; limits
    (memory, cpus) apply to docker steps and are reported as not enforced under rootfs."""
    from runner.docker_runtime import DockerRuntime, probe_engine

    engine = None if wanted == "rootfs" else probe_engine(host)
    if engine is not None:
        return DockerRuntime(host, data_dir, engine, limits)
    if limits is not None and (limits.memory or limits.cpus):
        log.warning("limits are not enforced on %s: the rootfs runtime has no cgroups", host.endpoint.address)
    if wanted == "docker":
        where = host.endpoint.address
        raise ProviderFailure(f"{where} has no Docker engine this login can use (runtime: docker)")
    runtime = RootfsRuntime(host, data_dir)
    runtime.bootstrap()
    return runtime


class RootfsRuntime(DetachedSteps):
    """Steps of one image, run under proot on a Docker-less host, detached from SSH."""

    name = "rootfs"

    def __init__(self, host: RemoteHost, data_dir: str) -> None:
        super().__init__(host, f"{absolute_folder(data_dir)}/runner")
        self.data_dir = absolute_folder(data_dir)
        self._probe: str | None = None
        self._prepared: tuple[str, dict] | None = None  # the rootfs and the image config

    def prepare_image(
        self,
        layers: ImageLayers,
        progress: LayerProgress | None = None,
        registry: RegistrySource | None = None,
        note: Callable[[str], None] | None = None,
    ) -> SyncReport:
        """Send the layers the host's cache lacks, then unpack them (unless already unpacked).
        The cache's files are named by their diffIDs, verified on receipt, so not hashed again.
        The space both need is asked for first."""
        unpacked = self._unpacked_layers(self._rootfs_of(layers.image_id)) is not None
        rootfs_bytes = 0 if unpacked else sum(layers.size_of(d) for d in dict.fromkeys(layers.diff_ids))
        report = sync_layers(
            self.host,
            layers,
            self.data_dir,
            progress,
            registry=registry,
            steps=self,
            note=note,
            also_needs=rootfs_bytes,
        )
        layout = RemoteLayout.at(self.data_dir)
        tars = [layout.layer(d) for d in layers.diff_ids]
        rootfs = self.prepare(layers.image_id, tars, [digest_hex(d) for d in layers.diff_ids])
        self._prepared = (rootfs, json.loads(layers.config))
        return report

    def start_step(
        self, run_dir_remote: str, step_name: str, script: str, env: Mapping[str, str], gpus: int
    ) -> StepHandle:
        """Start a step in the prepared image's rootfs (GPUs are bound whenever the host has them)."""
        if self._prepared is None:
            raise ProviderFailure(f"no image prepared on {self._where()} before step {step_name}")
        return self.start(run_dir_remote, step_name, script, env, *self._prepared)

    def clean_up(self, run_dir_remote: str) -> None:
        """Nothing: a stopped step leaves nothing outside the run's folder."""

    # -- the root file system -----------------------------------------------------

    def prepare(
        self,
        image_id: str,
        layer_tars: Sequence[str],
        digests: Sequence[str] | None = None,
        timeout: float = 3600.0,
    ) -> str:
        """The image's rootfs on the host, unpacked from its layer tars unless already there.
        digests (sha256 hex of each tar) are trusted when given; otherwise the tars are hashed.

        A rootfs is reused only if its marker lists exactly these layers' digests; anything
        else under its name (an interrupted or different unpack) is removed first. Unpacking
        goes to a temporary name renamed at the end, so a rootfs under its real name is whole.
        """
        root = self._rootfs_of(image_id)
        tars = [absolute_folder(path) for path in layer_tars]
        if not tars:
            raise BadInput(f"no layers given for image {image_id}")
        if digests is None:
            digests = [self.host.sha256(path, timeout=timeout) for path in tars]
        digests = list(digests)
        if self._unpacked_layers(root) == digests:
            return root
        self._check(self.host.run(["sh", "-c", _REMOVE_SH, "sh", root], timeout=timeout), f"remove {root}")
        unpacker = self.ship("unpack_layers.py")
        tmp = f"{root}.tmp-{secrets.token_hex(4)}"
        argv = ["python3", unpacker, "--rootfs", tmp, "--json"]
        argv += [
            arg
            for path, digest in zip(tars, digests, strict=True)
            for arg in ("--layer", path, "--digest", digest)
        ]
        result = self.host.run(argv, timeout=timeout)
        if result.exit_code != 0:
            self.host.run(["sh", "-c", _REMOVE_SH, "sh", tmp], timeout=timeout)
            error = BadInput if result.exit_code == 2 else ProviderFailure
            why = (result.stderr.strip().splitlines() or ["no reason given"])[-1]  # after its notes
            raise error(f"cannot unpack image {image_id} on {self._where()}: {why}")
        self._check(self.host.run(["mv", "-T", "--", tmp, root]), f"rename {tmp}")
        return root

    def _rootfs_of(self, image_id: str) -> str:
        return f"{self.base}/rootfs/{_image_hex(image_id)}"

    def _unpacked_layers(self, root: str) -> list[str] | None:
        """The layer digests a finished unpack recorded in root, or None."""
        result = self.host.run(["cat", "--", f"{root}/{MARKER}"])
        try:
            return json.loads(result.stdout)["layers"] if result.exit_code == 0 else None
        except (ValueError, KeyError, TypeError):
            return None

    # -- steps ----------------------------------------------------------------------

    def start(
        self,
        run_dir_remote: str,
        step_name: str,
        script: str,
        env: Mapping[str, str],
        rootfs: str,
        image_config: Mapping,
    ) -> StepHandle:
        """Start `sh -c SCRIPT` in the rootfs, detached; the run's data, job and out folders
        (under run_dir_remote) appear at /data, /job and /out, and /data is the working folder.

        image_config is the image's config JSON (as in `docker save`): its `config.Env` is the
        base environment, then env on top, then the GPU libraries first on LD_LIBRARY_PATH.
        """
        run_dir = absolute_folder(run_dir_remote)
        step_dir = step_folder(run_dir, step_name)
        folders = {name: f"{run_dir}/{name}" for name in ("data", "job", "out")}
        self._check(self.host.run(["mkdir", "-p", "--", *folders.values()]), f"create {run_dir}")
        proot, gpus = self._host_tools()
        binds = [arg for name, path in folders.items() for arg in ("-b", f"{path}:/{name}")]
        argv = [proot, "-r", absolute_folder(rootfs), "-b", "/proc", "-b", "/dev", "-b", "/sys", *binds]
        argv += ["-w", "/data", *gpus.proot_args, "/bin/sh", "-c", script]
        return self.launch(step_dir, argv, guest_env(image_config, env, gpus))

    def bootstrap(self) -> list[str]:
        """Install what the host lacks (proot, with apt-get as root or password-less sudo) and
        say so; return what was done. Done before any layer is sent, so a host that cannot run
        steps fails fast."""
        if self._proot() is not None:
            return []
        result = self.host.run(["sh", "-c", _INSTALL_PROOT_SH], timeout=900)
        self._probe = None
        if result.exit_code != 0 or self._proot() is None:
            reason = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise ProviderFailure(
                f"{self._where()} has no proot and it could not be installed ({reason});"
                " install it there (apt-get install proot) or use a host with Docker"
            )
        done = f"installed proot on {self._where()} with apt-get"
        log.warning("%s", done)
        return [done]

    def _proot(self) -> str | None:
        lines = self._probed().splitlines()
        return next((line.split(" ", 1)[1] for line in lines if line.startswith("proot ")), None)

    def _probed(self) -> str:
        if self._probe is None:
            self._probe = self._check(self.host.run(["sh", "-c", _PROBE_SH]), "probe the host").stdout
        return self._probe

    def _host_tools(self) -> tuple[str, GpuBinds]:
        """proot's path on the host and the GPU binds, probed once per runtime."""
        proot = self._proot()
        if proot is None:
            raise ProviderFailure(f"{self._where()} has no proot; install it (apt-get install proot)")
        return proot, gpu_binds(self._probed().splitlines())


def guest_env(image_config: Mapping, env: Mapping[str, str], gpus: GpuBinds) -> dict[str, str]:
    """The environment inside: the image's Env, then the step's env, then the GPU libraries.

    Nothing from the host leaks in (proot passes on exactly this); PATH and HOME get the
    defaults Docker would give when the image does not set them.
    """
    result = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    for item in (image_config.get("config") or {}).get("Env") or []:
        key, _, value = item.partition("=")
        result[key] = value
    for key, value in env.items():
        if not key or "=" in key or "\0" in key + value:
            raise BadInput(f"bad environment variable name or value: {key!r}")
        result[key] = value
    if gpus.library_dir:
        rest = result.get("LD_LIBRARY_PATH")
        result["LD_LIBRARY_PATH"] = gpus.library_dir + (f":{rest}" if rest else "")
    return result


def gpu_binds(listing: Iterable[str]) -> GpuBinds:
    """proot arguments that make the host's NVIDIA devices and driver libraries visible inside.

    listing holds the host probe's lines: `dev /dev/nvidia0`, `ld <a line of ldconfig -p>`,
    `file /usr/lib/x86_64-linux-gnu/libcuda.so.1`. Without a device there is no GPU, so nothing
    is bound. Each library is bound under GUEST_NVIDIA_LIBS by its own name; the first path
    seen for a name wins (ldconfig's order is the loader's), and 32-bit copies are skipped.
    """
    devices: list[str] = []
    libraries: dict[str, str] = {}
    for line in listing:
        kind, _, rest = line.partition(" ")
        if kind == "dev":
            devices.append(rest.strip())
        elif kind in ("ld", "file"):
            path = _ldconfig_path(rest) if kind == "ld" else rest.strip()
            name = PurePosixPath(path).name if path else ""
            if _DRIVER_LIB.fullmatch(name):
                libraries.setdefault(name, path)
    if not devices:
        return GpuBinds()
    args = [arg for device in sorted(devices) for arg in ("-b", device)]
    args += [arg for name, path in libraries.items() for arg in ("-b", f"{path}:{GUEST_NVIDIA_LIBS}/{name}")]
    return GpuBinds(tuple(args), GUEST_NVIDIA_LIBS if libraries else None)


def _ldconfig_path(line: str) -> str | None:
    """The path in an `ldconfig -p` line (`libcuda.so.1 (libc6,x86-64) => /usr/lib/...`),
    None for a 32-bit library (flags without a 64-bit architecture) or a header line."""
    head, arrow, path = line.partition(" => ")
    flags = head[head.find("(") + 1 : head.rfind(")")]
    return path.strip() if arrow and "64" in flags else None


def _image_hex(image_id: str) -> str:
    digest = image_id.removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BadInput(f"not an image ID (sha256:<64 hex digits>): {image_id!r}")
    return digest
