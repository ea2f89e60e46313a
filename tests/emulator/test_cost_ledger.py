"""The cost ledger against the emulator's own books: the run's cost.json, `runner cost` and the
balance difference agree with what the emulator charged, to within its billing granularity."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from tests.emulator.cloud import intervals, runner, submit, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_the_ledger_matches_the_emulators_charges_and_balance(cloud, tmp_path, tiny_image):
    spec = tiny_job(
        tmp_path, tiny_image, "ledger", "echo training; sleep 3; cat /data/prepared > /out/result"
    )
    code, payload, stderr = submit(cloud, spec)
    assert code == 0, stderr[-4000:]
    run_id, run_dir = payload["run_id"], Path(payload["run_dir"])
    assert "cost: " in stderr and " CNY (cpu " in stderr
    # no terminal: transfers show as plain lines, each layer's and output's last at 100%
    assert re.search(r"^  layer [0-9a-f]{12}: [0-9.]+/[0-9.]+ MB \(100%\)$", stderr, re.MULTILINE)
    assert "  output result: 0.0/0.0 MB (100%)" in stderr

    report = json.loads((run_dir / "cost.json").read_text())
    (total,) = report["totals"]
    charged = intervals(cloud, run_id)
    emulator_cost = sum(i["cost"] for i in charged)
    # the controller opens an interval when it asks for a boot, up to a few seconds before the
    # emulator accepts it; every interval ends at the emulator's own stop time (`stopped_at`)
    slack = sum(5 * i["price_per_hour"] / 3600 for i in charged)
    assert total["total"] == pytest.approx(emulator_cost, abs=slack)
    assert report["balance"]["spent"] == pytest.approx(emulator_cost, abs=slack)
    timeline = report["timeline"]
    assert [(i["mode"], i["phase"], i["source"]) for i in timeline] == [
        ("cpu", "provision", "provider"),
        ("gpu", "boot_gpu", "provider"),
        ("cpu", "collect", "provider"),
    ]
    assert [i["ended_at"] for i in timeline] == pytest.approx([i["ended_at"] for i in charged], abs=1e-3)
    for ours, theirs in zip(timeline, charged, strict=True):
        assert 0 <= theirs["started_at"] - ours["started_at"] <= 5
    assert (run_dir / "logs" / "watchdog.log").is_file()

    shown = runner(cloud, "cost", run_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["totals"] == report["totals"]
    table = runner(cloud, "cost", "--csv")
    rows = [row for row in csv.DictReader(io.StringIO(table.stdout)) if row["run_id"] == run_id]
    assert len(rows) == 1 and float(rows[0]["total"]) == pytest.approx(total["total"], abs=1e-4)
    assert rows[0]["currency"] == "CNY" and float(rows[0]["gpu_hours"]) > 0
