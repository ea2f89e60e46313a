"""`runner submit --detach`: the command returns at once, a background runner process drives
the run to its end, and `runner logs -f` follows it there."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import quick_job, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TRAIN = "for i in 1 2 3 4 5 6; do echo step $i; sleep 1; done; echo done > /out/result"


def test_a_detached_run_goes_on_without_its_terminal_and_logs_f_follows_it(image_id, tmp_path):
    spec = quick_job(tmp_path, image_id, train=TRAIN, outputs=["/out/result"])
    home = tmp_path / "home"
    started_at = time.monotonic()
    started = run_cli(home, "submit", str(spec), "--detach", "--json", "--out", str(tmp_path / "runs"))
    assert started.code == 0, started.stderr
    assert time.monotonic() - started_at < 30  # it returned before the 6 s train step could end
    run_id = started.json["run_id"]
    status = run_cli(home, "status", run_id, "--json").json
    assert status["status"] == "running" and status["driven_by_pid"] == started.json["pid"]

    followed = run_cli(home, "logs", run_id, "-f", timeout=300)
    assert followed.code == 0, followed.stderr
    assert followed.stdout.endswith("step 5\nstep 6\n") and f"run {run_id} succeeded" in followed.stderr
    final = run_cli(home, "status", run_id, "--json").json
    assert final["status"] == "succeeded" and final["driven_by_pid"] is None
    assert (Path(started.json["run_dir"]) / "artifacts" / "result").read_text() == "done\n"
    assert "run " + run_id in Path(started.json["log"]).read_text()  # the background process's own output


def test_a_bad_spec_fails_at_once_even_detached(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: BAD\n", encoding="utf-8")
    refused = run_cli(tmp_path / "home", "submit", str(spec), "--detach", "--json")
    assert refused.code == 2 and "invalid job spec" in json.loads(refused.stdout)["error"]
