"""What a run shows: rich bars on a terminal (a real pseudo-terminal, through `script`), plain
lines without one, and `--json` output that stays one JSON document either way."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from .conftest import quick_job, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# what trainer/finetune.py prints at each step
TRAIN = (
    'for i in 1 2 3 4 5; do echo "step $i/5 loss 3.$i lr 1.00e-03 100 tok/s padding 0.0%"; sleep 0.3; done;'
    " echo ok > /out/result"
)


def test_a_terminal_gets_bars(image_id, tmp_path):
    spec = quick_job(tmp_path, image_id, train=TRAIN, outputs=["/out/result"])
    command = shlex.join(
        [sys.executable, "-m", "runner", "submit", str(spec), "--out", str(tmp_path / "runs")]
    )
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home"), "COLUMNS": "160"}
    shown = subprocess.run(
        ["script", "-qfec", command, "/dev/null"], env=env, capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stdout[-3000:]
    assert "━" in shown.stdout and "5/5 steps" in shown.stdout and "loss 3.5000" in shown.stdout
    assert "[train] step 5/5 loss 3.5" in shown.stdout  # the trainer's own lines, above the bar


def test_a_pipe_gets_plain_lines_and_json_stays_pure(image_id, tmp_path):
    spec = quick_job(tmp_path, image_id, train=TRAIN, outputs=["/out/result"])
    done = run_cli(tmp_path / "home", "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert done.code == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["status"] == "succeeded"  # stdout is one JSON document
    assert "[train] step 5/5 loss 3.5" in done.stderr
    assert "━" not in done.stderr and "\x1b[" not in done.stderr
