"""Steps run detached on a remote host: started once, surviving the SSH session, read back later.

Links to rented GPUs drop, and a dropped link or a Ctrl-C on the laptop must never end a
training run, so every step runs under a small supervisor (remote_scripts/run_detached.py) that
leaves `pid`, `log` and `exit_code` files in the step's folder on the host's data disk. Any
later SSH session can then tell whether the step still runs, stream its log from a byte offset
and stop it. Both runtimes (rootfs and docker) build on this; they differ only in the command
they start and in how a signal reaches it.
"""

from __future__ import annotations

import base64
import enum
import json
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runner.errors import BadInput, ProviderFailure, RunFailed
from runner.remote import CommandResult, RemoteHost

SCRIPTS = Path(__file__).parent / "remote_scripts"
LOG_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

# Creates the step folder $1, private (its command.json holds the environment), unless the
# step was started before: a step runs once (run_detached.py checks again, against races).
_NEW_STEP_SH = (
    'mkdir -p -m 700 -- "$1" && for f in supervisor.pid pid exit_code; do '
    '[ ! -e "$1/$f" ] || { echo "step already started" >&2; exit 3; }; done'
)
# The command's pid if the step in folder $1 was started (0 if its command could not start),
# nothing if it never was. A supervisor caught between its start and the command's is given
# 30 s to write either file; "0" after that (poll then tells it was lost).
_FIND_SH = """d=$1
[ -f "$d/supervisor.pid" ] || exit 0
i=0
while [ ! -f "$d/pid" ] && [ ! -f "$d/exit_code" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if [ -f "$d/pid" ]; then cat "$d/pid"; else echo 0; fi"""
# Moves the step folder $1 aside as $1.1, $1.2, ... (the first free name) and prints that name.
_SET_ASIDE_SH = 'n=1; while [ -e "$1.$n" ]; do n=$((n + 1)); done; mv -T -- "$1" "$1.$n" && echo "$1.$n"'
# "exited CODE", "running" or "lost" for the step folder $1. exit_code is looked at again
# after the supervisor is found gone: it writes the file just before it ends. The supervisor
# counts as alive only if its pid runs *and* started when it did (supervisor.start): after the
# host restarts, its pid may belong to some other process. Each poll also leaves a heartbeat:
# the laptop is there (the watchdog can be told to stop a run once it has been gone too long).
_POLL_SH = """d=$1
touch "$d/heartbeat" 2>/dev/null
alive() {
  p=$(cat "$d/supervisor.pid" 2>/dev/null) && kill -0 "$p" 2>/dev/null || return 1
  [ -f "$d/supervisor.start" ] || return 0
  [ "$(cut -d' ' -f22 "/proc/$p/stat" 2>/dev/null)" = "$(cat "$d/supervisor.start")" ]
}
if [ -f "$d/exit_code" ]; then echo "exited $(cat "$d/exit_code")"
elif alive; then echo running
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


class DetachedSteps:
    """Start, watch and stop detached steps on one host; helper scripts live in `<base>/bin`."""

    def __init__(self, host: RemoteHost, base: str) -> None:
        self.host = host
        self.base = base

    def launch(
        self, step_dir: str, argv: Sequence[str], env: Mapping[str, str], inherit: Sequence[str] = ()
    ) -> StepHandle:
        """Start argv detached with exactly env (plus the host's values of the names in inherit);
        the step folder is created private, since command.json holds the environment."""
        self._check(self.host.run(["sh", "-c", _NEW_STEP_SH, "sh", step_dir]), f"start {step_dir}")
        command = {"argv": list(argv), "env": dict(env), "inherit": list(inherit)}
        self.put_json(f"{step_dir}/command.json", command)
        result = self.host.run(["python3", self.ship("run_detached.py"), step_dir], timeout=120)
        self._check(result, f"start {step_dir}")
        return StepHandle(step_dir, int(result.stdout.split()[-1]))

    def find(self, step_dir: str) -> StepHandle | None:
        """The step started in step_dir by any earlier session, or None if it never was: a
        controller that resumes a run reattaches to its step instead of starting it twice."""
        out = self._check(self.host.run(["sh", "-c", _FIND_SH, "sh", step_dir], timeout=60), "look up").stdout
        return StepHandle(step_dir, int(out.split()[-1])) if out.strip() else None

    def set_aside(self, handle: StepHandle) -> str:
        """Move a lost step's folder aside (kept for inspection), so the step can start anew."""
        result = self.host.run(["sh", "-c", _SET_ASIDE_SH, "sh", handle.step_dir])
        return self._check(result, f"move {handle.step_dir} aside").stdout.strip()

    def ship(self, script: str) -> str:
        """Put a helper script in the host's runner/bin (sent only when it changed)."""
        remote = f"{self.base}/bin/{script}"
        self.host.put(SCRIPTS / script, remote)
        return remote

    def put_json(self, remote: str, value: object) -> None:
        """Write a small file on the host through a verified upload (no shell in between)."""
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "value.json"
            local.write_text(json.dumps(value), encoding="utf-8")
            self.host.put(local, remote)

    def poll(self, handle: StepHandle) -> StepStatus:
        """Whether the step still runs, and its exit code once it ended."""
        out = self._check(self.host.query(["sh", "-c", _POLL_SH, "sh", handle.step_dir]), "poll").stdout
        word, _, code = out.strip().partition(" ")
        if word == "exited":
            return StepStatus(StepState.EXITED, int(code))
        return StepStatus(StepState(word))

    def read_log(self, handle: StepHandle, offset: int = 0, limit: int = LOG_CHUNK) -> tuple[bytes, int]:
        """Log bytes from offset on (at most limit), and the offset to continue from."""
        argv = ["sh", "-c", _READ_LOG_SH, "sh", f"{handle.step_dir}/log", str(offset), str(limit)]
        data = base64.b64decode(self._check(self.host.query(argv), "read the log").stdout)
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
            self._signal(handle, signal)
            if (code := self._ended_within(handle, wait_s)) is not None:
                return code
        status = self.poll(handle)
        if status.state is StepState.RUNNING:
            raise ProviderFailure(f"step {handle.step_dir} on {self._where()} survived SIGKILL")
        if status.state is StepState.LOST:
            raise ProviderFailure(f"step {handle.step_dir} on {self._where()} ended without exit code")
        return status.exit_code

    def _signal(self, handle: StepHandle, signal: str) -> None:
        """Send TERM or KILL to the step's process group (its command leads one)."""
        if handle.pid > 0:
            self.host.run(["kill", f"-{signal}", "--", f"-{handle.pid}"])

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


def absolute_folder(path: str) -> str:
    """An absolute, normalised remote folder path without '..' or control characters."""
    if not path.startswith("/") or ".." in path.split("/") or any(ord(c) < 32 for c in path):
        raise BadInput(f"remote path must be absolute, without '..': {path!r}")
    return str(PurePosixPath(path))


def step_folder(run_dir: str, step_name: str) -> str:
    """Where a step's files live: `<run_dir>/steps/<step_name>`, the name checked first."""
    if not _NAME.fullmatch(step_name):
        raise BadInput(f"bad step name {step_name!r}: letters, digits, '.', '_' and '-' only")
    return f"{absolute_folder(run_dir)}/steps/{step_name}"
