"""Start one step's command detached from the SSH session that asked for it, and record its end.

Standalone: standard library only, Python >= 3.8. The controller ships it to the host and runs
``python3 run_detached.py STEP_DIR``. The command and its environment come from
``STEP_DIR/command.json`` (``{"argv": [...], "env": {...}, "inherit": [...]}``), written by the
controller, so no value ever passes through a shell and no secret shows up in ``ps``. The
command gets exactly ``env``, plus this host's own values of the names in ``inherit`` (such as
``PATH`` or ``DOCKER_HOST`` for a docker client).

A supervisor process, in a session of its own, starts the command in a further session (so a
signal sent to the command's process group never reaches the supervisor), and writes:

- ``STEP_DIR/supervisor.pid``: the supervisor, alive until the exit code is written (and
  ``supervisor.start``, its start time, so a later process with the same pid is not taken for it);
- ``STEP_DIR/pid``: the command, which leads its own process group (stop it with ``kill -- -PID``);
- ``STEP_DIR/log``: the command's stdout and stderr together;
- ``STEP_DIR/exit_code``: written atomically once the command ended, whatever the reason
  (128 + N after signal N; 127 when it could not be started).

This process prints the command's pid (0 when it could not be started) once the files exist and
exits, which closes the SSH channel; the step runs on. A step folder that already holds a pid or
an exit code is refused (exit 3): a step is started once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

STARTED = ("supervisor.pid", "pid", "exit_code")


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def supervise(step_dir: str, argv: list, env: dict) -> int:
    """Run the command to its end; the exit code file is written even if it never started."""
    code = 127
    with open(os.path.join(step_dir, "log"), "ab") as log:
        try:
            child = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            log.write(f"runner: cannot start {argv[0]}: {e}\n".encode())
        else:
            write_atomic(os.path.join(step_dir, "pid"), f"{child.pid}\n")
            code = child.wait()
            code = 128 - code if code < 0 else code
    write_atomic(os.path.join(step_dir, "exit_code"), f"{code}\n")
    return code


def start_time(pid: int) -> str:
    """When the process started (clock ticks since boot, /proc/PID/stat field 22): with the
    pid, it tells this supervisor from a later process that got the same pid."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def detach(step_dir: str, spec: dict) -> None:
    """In the forked child: leave the SSH session for good, then supervise."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # sshd waits for these pipes to close before it ends the channel
        os.dup2(null, fd)
    write_atomic(os.path.join(step_dir, "supervisor.start"), f"{start_time(os.getpid())}\n")
    write_atomic(os.path.join(step_dir, "supervisor.pid"), f"{os.getpid()}\n")
    try:
        inherited = {name: os.environ[name] for name in spec.get("inherit", []) if name in os.environ}
        supervise(step_dir, spec["argv"], {**inherited, **spec["env"]})
    finally:
        os._exit(0)


def wait_started(step_dir: str, timeout: float = 30.0) -> int:
    """The command's pid once the supervisor wrote it (0 if the command failed to start)."""
    pid_file, exit_file = (os.path.join(step_dir, name) for name in ("pid", "exit_code"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = os.path.exists(exit_file)  # looked at first: pid is written before exit_code
        if os.path.exists(pid_file):
            with open(pid_file) as f:
                return int(f.read())
        if ended:
            return 0
        time.sleep(0.02)
    raise TimeoutError(f"the step in {step_dir} did not start within {timeout}s")


def main(argv: list) -> int:
    if len(argv) != 1:
        print("usage: run_detached.py STEP_DIR", file=sys.stderr)
        return 2
    step_dir = argv[0]
    if any(os.path.exists(os.path.join(step_dir, name)) for name in STARTED):
        print(f"error: {step_dir}: step already started", file=sys.stderr)
        return 3
    with open(os.path.join(step_dir, "command.json")) as f:
        spec = json.load(f)
    if os.fork() == 0:
        detach(step_dir, spec)
    print(wait_started(step_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
