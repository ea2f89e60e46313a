"""Steps left running on a remote host: find them again, follow their logs, stop them.

A Ctrl-C (or a closed terminal) during a remote step ends the laptop's session, never the
step: the pipeline records a `step.detached` event with what it takes to log in again (no
secret: a password stays in its environment variable) and how far the log was shown. These
functions pick the step up from there, in any later session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.ssh import STEP_TIMEOUT_S
from runner.errors import BadInput
from runner.store import Run, Store, open_store

STOP_GRACE_S = 30  # time for a trainer to checkpoint after SIGTERM, before SIGKILL
_ENDED = ("step.exited", "step.stopped")


@dataclass(frozen=True)
class DetachedStep:
    name: str
    host: str
    step_dir: str
    offset: int
    state: str  # "running", "exited" or "lost"
    exit_code: int | None

    def to_dict(self) -> dict:
        return vars(self)


def local_logs(run: Run) -> list[Path]:
    """The run's step logs in the order the steps ran (setup steps, then train)."""
    folder = Path(run.run_dir) / "logs"
    setup = sorted(folder.glob("setup-*.log"))
    train = [folder / "train.log"] if (folder / "train.log").is_file() else []
    return setup + train


def tail_local(
    run_id: str,
    write: Callable[[bytes], None],
    shown: dict[Path, int],
    announce: Callable[[Path], None],
    poll_s: float = 0.5,
) -> Run:
    """Stream what the runner process driving the run (a detached submit, another terminal)
    adds to its step logs, past what shown says was printed of each, until that process ends;
    announce(path) is called before a log's first bytes. The run as it then stands."""
    from runner import runlock

    while True:
        driven = runlock.holder(run_id) is not None
        for path in local_logs(find_run(run_id)):
            start, size = shown.get(path, 0), path.stat().st_size
            if size > start:
                if path not in shown:
                    announce(path)
                with path.open("rb") as log:
                    log.seek(start)
                    write(log.read(size - start))
                shown[path] = size
        if not driven:
            return find_run(run_id)
        time.sleep(poll_s)


def find_run(ref: str) -> Run:
    with open_store() as store:
        return store.get_run(ref)


def left_running(store: Store, run_id: str) -> dict | None:
    """The last step.detached event's data, unless that step was seen ending since."""
    found: dict | None = None
    for event in store.events(run_id):
        if event.kind == "step.detached":
            found = event.data
        elif event.kind in _ENDED and found and event.data.get("step_dir") == found["step_dir"]:
            found = None
    return found


@contextmanager
def _reattached(store: Store, info: dict) -> Iterator[tuple[object, object]]:
    """The runtime on the step's host, logged in again, and the step's handle."""
    from infra.ssh import Login
    from runner.runtimes import open_runtime
    from runner.steps import StepHandle

    with Login.from_dict(info["login"]).connect(store) as remote:
        runtime = open_runtime(remote, info["data_dir"], info["runtime"])
        yield runtime, StepHandle(info["step_dir"], info["pid"])


def remote_state(ref: str) -> DetachedStep | None:
    """How the step a run left running is doing now (None when it left none)."""
    found = _on_left_step(ref, lambda runtime, handle, info: runtime.poll(handle))
    if found is None:
        return None
    info, status = found
    return _describe(info, status.state.value, status.exit_code)


def follow(ref: str, write: Callable[[bytes], None]) -> DetachedStep | None:
    """Stream the left-running step's log from where the run's own log stopped, until the step
    ends; record its exit. None when the run left no step running."""

    def stream(runtime, handle, info: dict) -> int:
        return runtime.wait(handle, STEP_TIMEOUT_S, write, offset=int(info["offset"]))

    found = _on_left_step(ref, stream, record="step.exited")
    return None if found is None else _describe(found[0], "exited", found[1])


def stop(ref: str) -> DetachedStep:
    """SIGTERM the left-running step (SIGKILL after STOP_GRACE_S) and record how it ended."""
    found = _on_left_step(
        ref, lambda runtime, handle, info: runtime.stop(handle, grace_s=STOP_GRACE_S), "step.stopped"
    )
    if found is None:
        raise BadInput(f"run {ref} has no step left running on a host")
    return _describe(found[0], "exited", found[1])


def _on_left_step(ref: str, act: Callable, record: str | None = None) -> tuple[dict, object] | None:
    """act(runtime, handle, info) on the step the run left running, logged in again; with record,
    its result is recorded as that event's exit code. None when the run left no step running."""
    with open_store() as store:
        run = store.get_run(ref)
        info = left_running(store, run.id)
        if info is None:
            return None
        with _reattached(store, info) as (runtime, handle):
            result = act(runtime, handle, info)
        if record is not None:
            store.add_event(run.id, record, step_dir=info["step_dir"], name=info["name"], exit_code=result)
        return info, result


def _describe(info: dict, state: str, exit_code: int | None) -> DetachedStep:
    login = info["login"]
    host = f"{login['user']}@{login['host']}:{login['port']}"
    return DetachedStep(info["name"], host, info["step_dir"], int(info["offset"]), state, exit_code)
