"""The watchdog script on its own, on this machine: a real supervised step (run_detached.py),
the power-off command replaced by one that leaves a file, so its decisions can be checked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.remote_scripts import watchdog

pytestmark = pytest.mark.unit
SCRIPTS = Path(watchdog.__file__).parent


def test_last_step_ignores_a_half_written_line_and_junk(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert watchdog.last_step(str(metrics)) is None
    metrics.write_text('{"step": 1}\n{"step": 2, "loss": 0.5}\nnot json\n{"step": 3, "lo')
    assert watchdog.last_step(str(metrics)) == 2


def start_step(step_dir: Path, script: str) -> None:
    step_dir.mkdir(mode=0o700, parents=True)
    (step_dir / "command.json").write_text(json.dumps({"argv": ["sh", "-c", script], "env": {}}))
    subprocess.run([sys.executable, str(SCRIPTS / "run_detached.py"), str(step_dir)], check=True, timeout=30)


def guard(tmp_path: Path, **config) -> list[dict]:
    base = {
        "step_dir": str(tmp_path / "train"),
        "metrics": str(tmp_path / "metrics.jsonl"),
        "interval_s": 0.1,
        "grace_s": 2,
        "power_off": ["touch", str(tmp_path / "powered-off")],
        "log": str(tmp_path / "watchdog.log"),
    }
    path = tmp_path / "watchdog.json"
    path.write_text(json.dumps({**base, **config}))
    subprocess.run([sys.executable, str(SCRIPTS / "watchdog.py"), str(path)], check=True, timeout=60)
    return [json.loads(line) for line in (tmp_path / "watchdog.log").read_text().splitlines()]


def test_a_finished_trainer_is_followed_by_the_power_off(tmp_path):
    start_step(tmp_path / "train", "sleep 0.5; exit 7")
    decisions = guard(tmp_path)
    assert [d["action"] for d in decisions] == ["start", "power_off"]
    assert decisions[-1]["reason"] == "the trainer exited with code 7"
    assert (tmp_path / "powered-off").exists()


def test_a_stalled_trainer_gets_sigterm_then_the_power_off(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    start_step(
        tmp_path / "train",
        f"trap 'exit 143' TERM; echo '{{\"step\": 5}}' >> {metrics}; while :; do sleep 0.1; done",
    )
    started = time.monotonic()
    decisions = guard(tmp_path, stall_s=1)
    assert [d["action"] for d in decisions] == ["start", "stop", "power_off"]
    assert decisions[1]["reason"] == "no new training step for 1s (last step 5)"
    assert (tmp_path / "train" / "exit_code").read_text().strip() == "143"
    assert time.monotonic() - started < 10


def test_a_trainer_without_metrics_is_not_taken_for_stuck_but_a_silent_laptop_stops_it(tmp_path):
    start_step(tmp_path / "train", "sleep 30")
    (tmp_path / "train" / "heartbeat").touch()
    decisions = guard(tmp_path, stall_s=0.5, heartbeat_s=1.5)
    assert decisions[1]["reason"].startswith("no heartbeat from the laptop for")
    assert (tmp_path / "train" / "exit_code").read_text().strip() == "143"  # 128 + SIGTERM


def test_no_power_off_command_only_stops(tmp_path):
    start_step(tmp_path / "train", "true")
    decisions = guard(tmp_path, power_off=None)
    assert [d["action"] for d in decisions] == ["start", "done"]
    assert not (tmp_path / "powered-off").exists()
