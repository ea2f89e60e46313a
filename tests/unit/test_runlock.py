"""One driver per run: the lock that `submit` and `resume` hold."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runner import runlock
from runner.errors import EXIT_BAD_INPUT
from runner.pipeline import _finished_phases
from runner.store import Phase

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    return tmp_path


def test_a_held_run_is_refused_to_a_second_driver_and_free_after():
    assert runlock.holder("r1") is None
    with runlock.hold("r1"):
        assert runlock.holder("r1") == os.getpid()
        with pytest.raises(runlock.RunBusy) as refused, runlock.hold("r1"):
            pass
        assert refused.value.exit_code == EXIT_BAD_INPUT
        assert f"run r1 is driven by another runner process (pid {os.getpid()})" in refused.value.message
        with runlock.hold("r2"):  # other runs are not affected
            pass
    assert runlock.holder("r1") is None
    with runlock.hold("r1"):
        pass


def test_the_lock_dies_with_its_process(home):
    """SIGKILL included: the kernel drops an flock when its holder's descriptors close."""
    script = "from runner import runlock; import os\nwith runlock.hold('r1'): os._exit(9)"
    env = {**os.environ, "RUNNER_HOME": str(home)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 9
    assert runlock.holder("r1") is None
    assert oct((home / "locks").stat().st_mode & 0o777) == "0o700"


def phase(name: str, status: str, attempt: int = 1) -> Phase:
    return Phase("r", name, attempt, status, 1.0, 2.0, None)


def test_a_resume_starts_at_the_first_phase_whose_last_attempt_did_not_succeed():
    phases = [
        phase("plan", "succeeded"),
        phase("provision", "succeeded"),
        phase("stage", "failed"),
        phase("teardown", "succeeded"),
        phase("plan", "succeeded", 2),
        phase("stage", "succeeded", 2),
        phase("boot_gpu", "skipped"),
        phase("train", "interrupted"),
    ]
    assert _finished_phases(phases) == {"provision", "stage", "boot_gpu"}  # plan and teardown always run
