"""Guard one training step on its host, so the GPU stops billing whether or not the laptop is there.

Standalone: standard library only, Python >= 3.8. The controller ships it to the host and starts
it detached (as a step of its own, under run_detached.py) just before the trainer:
``python3 watchdog.py CONFIG_JSON``. The configuration names the trainer's step folder (the files
run_detached.py writes there: ``pid``, ``exit_code``, ``supervisor.pid``) and what to do:

- the trainer ended (any exit code), vanished without one, or never started (``start_s``):
  power off at once;
- no new step in the trainer's metrics for ``stall_s``, the run's time cap ``max_run_s`` reached,
  or (only when configured) no heartbeat from the laptop for ``heartbeat_s``: stop the trainer
  (SIGTERM, so it can checkpoint; SIGKILL after ``grace_s``), then power off.

"Power off" is the provider's command (``shutdown`` on AutoDL and the emulator); with none (an SSH
host the user owns) the watchdog only stops the trainer. Every decision is appended to
``log`` with its reason, as one JSON object per line, on the host's data disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time


class Watch:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.step_dir = config["step_dir"]
        self.started = time.monotonic()
        self.last_step = None
        self.progress_at = self.started

    def decide(self, action: str, reason: str, **extra: object) -> None:
        entry = {"ts": time.time(), "action": action, "reason": reason, **extra}
        with open(self.config["log"], "a") as log:
            log.write(json.dumps(entry) + "\n")

    def step_file(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.step_dir, name)) as f:
                return f.read().strip()
        except OSError:
            return None

    def trainer_ended(self) -> str | None:
        """Why the trainer is over (its exit code, or vanished), or None while it runs."""
        code = self.step_file("exit_code")
        if code is not None:
            return f"the trainer exited with code {code}"
        supervisor = self.step_file("supervisor.pid")
        if supervisor is None:
            waited = time.monotonic() - self.started
            start_s = self.config.get("start_s", 600)
            return f"the trainer did not start within {start_s:.0f}s" if waited > start_s else None
        if alive(int(supervisor)):
            return None
        code = self.step_file("exit_code")  # written just before the supervisor ends: look again
        return f"the trainer exited with code {code}" if code is not None else "the trainer vanished"

    def progressed(self) -> None:
        """Note the time whenever the metrics file shows a new last step. Stalls are judged only
        once a first step was seen: a trainer that writes no metrics is never taken for stuck."""
        step = last_step(self.config.get("metrics"))
        if step is not None and step != self.last_step:
            self.last_step, self.progress_at = step, time.monotonic()

    def reason_to_stop(self) -> str | None:
        now = time.monotonic()
        stall, cap, heartbeat = (self.config.get(k) for k in ("stall_s", "max_run_s", "heartbeat_s"))
        if stall and self.last_step is not None and now - self.progress_at > stall:
            return f"no new training step for {stall:.0f}s (last step {self.last_step})"
        if cap and now - self.started > cap:
            return f"budget: the run's GPU time or cost cap is reached after {cap:.0f}s"
        if heartbeat:
            age = heartbeat_age(os.path.join(self.step_dir, "heartbeat"))
            if age is not None and age > heartbeat:
                return f"no heartbeat from the laptop for {age:.0f}s"
        return None

    def stop_trainer(self, reason: str) -> None:
        self.decide("stop", reason, last_step=self.last_step, budget=reason.startswith("budget:"))
        for name, wait_s in (("TERM", self.config.get("grace_s", 30)), ("KILL", 15)):
            self.signal(name)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self.step_file("exit_code") is not None:
                    return
                time.sleep(0.5)

    def signal(self, name: str) -> None:
        """SIGTERM or SIGKILL to the trainer: through its container when it runs in one."""
        container = self.config.get("container")
        if container:
            subprocess.run(["docker", "kill", "--signal", name, container], capture_output=True, timeout=60)
            return
        pid = int(self.step_file("pid") or 0)
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, getattr(signal, f"SIG{name}"))

    def power_off(self, reason: str) -> None:
        argv = self.config.get("power_off")
        self.decide("power_off" if argv else "done", reason, exit_code=self.step_file("exit_code"))
        if argv:
            subprocess.run(argv, capture_output=True, timeout=120)

    def run(self) -> int:
        interval = self.config.get("interval_s", 5)
        self.decide("start", "guarding the trainer", pid=os.getpid())
        while True:
            ended = self.trainer_ended()
            if ended:
                self.power_off(ended)
                return 0
            self.progressed()
            reason = self.reason_to_stop()
            if reason:
                self.stop_trainer(reason)
                self.power_off(f"stopped: {reason}")
                return 0
            time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_step(path: str | None) -> int | None:
    """The `step` of the last complete line of a metrics.jsonl file (None if there is none)."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = f.read().split(b"\n")[:-1]  # the last piece is incomplete, or empty
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return None


def heartbeat_age(path: str) -> float | None:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return None


def main(argv: list) -> int:
    if len(argv) != 1:
        print("usage: watchdog.py CONFIG_JSON", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        return Watch(json.load(f)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
