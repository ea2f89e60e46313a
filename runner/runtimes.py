"""How a job's container runs on a rented host that has no Docker: the `rootfs` runtime.

AutoDL-style instances are containers themselves, so the image's layers are unpacked into a
root file system cached on the data disk by image ID, and each step runs in it under `proot`
(ptrace, no privileges). Steps run detached from the SSH session: links to rented GPUs drop,
and a dropped link or a Ctrl-C on the laptop must never end a training run. Each step leaves
`pid`, `log` and `exit_code` files in its folder, so a later session can find out what
happened and stream the log from where it left off. The host needs only POSIX sh, coreutils,
python3 and proot; the helpers it runs are shipped as files, and every value from the caller
reaches it as a quoted argument or inside a JSON file, never as shell text.
"""

from __future__ import annotations

import base64
import enum
import json
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runner.errors import BadInput, ProviderFailure, RunFailed
from runner.remote import CommandResult, RemoteHost

SCRIPTS = Path(__file__).parent / "remote_scripts"
MARKER = ".runner-unpacked.json"  # written by unpack_layers.py once every layer applied
GUEST_NVIDIA_LIBS = "/usr/local/nvidia/lib64"  # where NVIDIA's CUDA images look for the driver
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
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
# Creates the step folder $1, private (its command.json holds the environment), unless the
# step was started before: a step runs once (run_detached.py checks again, against races).
_NEW_STEP_SH = (
    'mkdir -p -m 700 -- "$1" && for f in pid exit_code; do '
    '[ ! -e "$1/$f" ] || { echo "step already started" >&2; exit 3; }; done'
)
# "exited CODE", "running" or "lost" for the step folder $1. exit_code is looked at again
# after the supervisor is found gone: it writes the file just before it ends.
_POLL_SH = """d=$1
if [ -f "$d/exit_code" ]; then echo "exited $(cat "$d/exit_code")"
elif [ -f "$d/supervisor.pid" ] && kill -0 "$(cat "$d/supervisor.pid")" 2>/dev/null; then echo running
elif [ -f "$d/exit_code" ]; then echo "exited $(cat "$d/exit_code")"
else echo lost; fi"""
# Up to $3 bytes of the log $1 from byte offset $2, base64 encoded (the log may not be text).
_READ_LOG_SH = '[ -f "$1" ] || exit 0; tail -c +"$(($2 + 1))" -- "$1" | head -c "$3" | base64'


class StepState(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"
    LOST = "lost"  # neither running nor an exit code: the host rebooted or the supervisor was killed


@dataclass(frozen=True)
class StepStatus:
    state: StepState
    exit_code: int | None = None


@dataclass(frozen=True)
class StepHandle:
    """A started step: plain data, so it can be stored and used from a later SSH session."""

    step_dir: str
    pid: int  # the command's pid, which is also its process group


@dataclass(frozen=True)
class GpuBinds:
    """What proot needs for the host's GPUs to work inside the rootfs."""

    proot_args: tuple[str, ...] = ()
    library_dir: str | None = None  # to put first on LD_LIBRARY_PATH inside


class RootfsRuntime:
    """Steps of one image, run under proot on a Docker-less host, detached from SSH."""

    def __init__(self, host: RemoteHost, data_dir: str) -> None:
        self.host = host
        self.base = f"{_absolute(data_dir)}/runner"
        self._probe: str | None = None

    # -- the root file system -----------------------------------------------------

    def prepare(self, image_id: str, layer_tars: Sequence[str], timeout: float = 3600.0) -> str:
        """The image's rootfs on the host, unpacked from its layer tars unless already there.

        A rootfs is reused only if its marker lists exactly these layers' digests; anything
        else under its name (an interrupted or different unpack) is removed first. Unpacking
        goes to a temporary name renamed at the end, so a rootfs under its real name is whole.
        """
        root = f"{self.base}/rootfs/{_image_hex(image_id)}"
        tars = [_absolute(path) for path in layer_tars]
        if not tars:
            raise BadInput(f"no layers given for image {image_id}")
        digests = [self.host.sha256(path, timeout=timeout) for path in tars]
        if self._unpacked_layers(root) == digests:
            return root
        self._check(self.host.run(["sh", "-c", _REMOVE_SH, "sh", root], timeout=timeout), f"remove {root}")
        unpacker = self._ship("unpack_layers.py")
        tmp = f"{root}.tmp-{secrets.token_hex(4)}"
        argv = ["python3", unpacker, "--rootfs", tmp, "--json"]
        result = self.host.run(argv + [arg for path in tars for arg in ("--layer", path)], timeout=timeout)
        if result.exit_code != 0:
            self.host.run(["sh", "-c", _REMOVE_SH, "sh", tmp], timeout=timeout)
            error = BadInput if result.exit_code == 2 else ProviderFailure
            raise error(f"cannot unpack image {image_id} on {self._where()}: {result.stderr.strip()}")
        self._check(self.host.run(["mv", "-T", "--", tmp, root]), f"rename {tmp}")
        return root

    def _unpacked_layers(self, root: str) -> list[str] | None:
        """The layer digests a finished unpack recorded in root, or None."""
        result = self.host.run(["cat", "--", f"{root}/{MARKER}"])
        try:
            return json.loads(result.stdout)["layers"] if result.exit_code == 0 else None
        except (ValueError, KeyError, TypeError):
            return None

    def _ship(self, script: str) -> str:
        """Put a helper script in the host's runner/bin (sent only when it changed)."""
        remote = f"{self.base}/bin/{script}"
        self.host.put(SCRIPTS / script, remote)
        return remote

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
        run_dir = _absolute(run_dir_remote)
        if not _NAME.fullmatch(step_name):
            raise BadInput(f"bad step name {step_name!r}: letters, digits, '.', '_' and '-' only")
        step_dir = f"{run_dir}/steps/{step_name}"
        folders = {name: f"{run_dir}/{name}" for name in ("data", "job", "out")}
        self._check(self.host.run(["mkdir", "-p", "--", *folders.values()]), f"create {run_dir}")
        self._check(self.host.run(["sh", "-c", _NEW_STEP_SH, "sh", step_dir]), f"start step {step_name}")
        proot, gpus = self._host_tools()
        binds = [arg for name, path in folders.items() for arg in ("-b", f"{path}:/{name}")]
        argv = [proot, "-r", _absolute(rootfs), "-b", "/proc", "-b", "/dev", "-b", "/sys", *binds]
        argv += ["-w", "/data", *gpus.proot_args, "/bin/sh", "-c", script]
        self._put_json(f"{step_dir}/command.json", {"argv": argv, "env": guest_env(image_config, env, gpus)})
        result = self.host.run(["python3", self._ship("run_detached.py"), step_dir], timeout=120)
        self._check(result, f"start step {step_name}")
        return StepHandle(step_dir, int(result.stdout.split()[-1]))

    def _host_tools(self) -> tuple[str, GpuBinds]:
        """proot's path on the host and the GPU binds, probed once per runtime."""
        if self._probe is None:
            self._probe = self._check(self.host.run(["sh", "-c", _PROBE_SH]), "probe the host").stdout
        lines = self._probe.splitlines()
        proot = next((line.split(" ", 1)[1] for line in lines if line.startswith("proot ")), None)
        if proot is None:
            raise ProviderFailure(f"{self._where()} has no proot; install it (apt-get install proot)")
        return proot, gpu_binds(lines)

    def _put_json(self, remote: str, value: object) -> None:
        """Write a small file on the host through a verified upload (no shell in between)."""
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "value.json"
            local.write_text(json.dumps(value), encoding="utf-8")
            self.host.put(local, remote)

    def poll(self, handle: StepHandle) -> StepStatus:
        """Whether the step still runs, and its exit code once it ended."""
        out = self._check(self.host.run(["sh", "-c", _POLL_SH, "sh", handle.step_dir]), "poll").stdout
        word, _, code = out.strip().partition(" ")
        if word == "exited":
            return StepStatus(StepState.EXITED, int(code))
        return StepStatus(StepState(word))

    def read_log(self, handle: StepHandle, offset: int = 0, limit: int = LOG_CHUNK) -> tuple[bytes, int]:
        """Log bytes from offset on (at most limit), and the offset to continue from."""
        argv = ["sh", "-c", _READ_LOG_SH, "sh", f"{handle.step_dir}/log", str(offset), str(limit)]
        data = base64.b64decode(self._check(self.host.run(argv), "read the log").stdout)
        return data, offset + len(data)

    def wait(
        self,
        handle: StepHandle,
        timeout: float,
        on_output: Callable[[bytes], None] | None = None,
        offset: int = 0,
    ) -> int:
        """Stream the log from offset to on_output until the step ends; return its exit code.

        Polls at a growing interval capped at 2 s; a step still running at the deadline raises
        RunFailed (the step is left running), one whose supervisor vanished ProviderFailure.
        """
        deadline = time.monotonic() + timeout
        interval = 0.1
        while True:
            status = self.poll(handle)  # before draining, so no output after the end is missed
            offset = self._drain(handle, offset, on_output)
            if status.state is StepState.EXITED:
                return status.exit_code
            if status.state is StepState.LOST:
                raise ProviderFailure(f"step {handle.step_dir} on {self._where()} ended without exit code")
            if time.monotonic() + interval > deadline:
                raise RunFailed(f"step {handle.step_dir} on {self._where()} still runs after {timeout:.0f}s")
            time.sleep(interval)
            interval = min(2.0, interval * 1.5)

    def _drain(self, handle: StepHandle, offset: int, on_output: Callable[[bytes], None] | None) -> int:
        while True:
            data, offset = self.read_log(handle, offset)
            if data and on_output is not None:
                on_output(data)
            if len(data) < LOG_CHUNK:
                return offset

    def stop(self, handle: StepHandle, grace_s: float = 30.0) -> int:
        """SIGTERM to the step's process group, SIGKILL if it still runs after grace_s;
        return the exit code recorded. A step that already ended is left alone.

        The command itself gets the SIGTERM (a trainer can checkpoint and exit with its own
        code); one killed by a signal is recorded as 255, the status proot gives it.
        """
        for signal, wait_s in (("TERM", grace_s), ("KILL", 15.0)):
            if self.poll(handle).state is not StepState.RUNNING:
                break
            if handle.pid > 0:
                self.host.run(["kill", f"-{signal}", "--", f"-{handle.pid}"])
            if (code := self._ended_within(handle, wait_s)) is not None:
                return code
        status = self.poll(handle)
        if status.state is StepState.RUNNING:
            raise ProviderFailure(f"step {handle.step_dir} on {self._where()} survived SIGKILL")
        if status.state is StepState.LOST:
            raise ProviderFailure(f"step {handle.step_dir} on {self._where()} ended without exit code")
        return status.exit_code

    def _ended_within(self, handle: StepHandle, seconds: float) -> int | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = self.poll(handle)
            if status.state is not StepState.RUNNING:
                return status.exit_code
            time.sleep(0.2)
        return None

    # -- helpers --------------------------------------------------------------------

    def _check(self, result: CommandResult, what: str) -> CommandResult:
        if result.exit_code != 0:
            detail = result.stderr.strip() or result.stdout.strip()
            raise ProviderFailure(f"cannot {what} on {self._where()}: {detail}")
        return result

    def _where(self) -> str:
        return self.host.endpoint.address


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


def _absolute(path: str) -> str:
    """An absolute, normalised remote folder path without '..' or control characters."""
    if not path.startswith("/") or ".." in path.split("/") or any(ord(c) < 32 for c in path):
        raise BadInput(f"remote path must be absolute, without '..': {path!r}")
    return str(PurePosixPath(path))
