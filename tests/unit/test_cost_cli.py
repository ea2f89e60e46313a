"""`runner cost` over a ledger with runs on two providers, two days and two currencies."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.cost import Interval
from runner.store import Store
from tests.unit.test_store import make_run

pytestmark = pytest.mark.unit

DAY1 = datetime(2026, 11, 28, 12).timestamp()
DAY2 = datetime(2026, 11, 29, 12).timestamp()


@pytest.fixture
def ledger():
    """Three runs: two on the emulator (CNY) on two days, one on AWS (USD) on the second."""
    with Store(Path(os.environ["RUNNER_HOME"])) as store:
        for run_id, provider, created, rates, currency in (
            ("alpha", "emulator", DAY1, (0.1, 2.15), "CNY"),
            ("beta", "emulator", DAY2, (0.1, 2.15), "CNY"),
            ("gamma", "aws", DAY2, (0.0832, 0.526), "USD"),
        ):
            store.create_run(replace(make_run(run_id, created), provider=provider))
            store.finish_run(run_id, "succeeded", 0, None)
            cpu, gpu = rates
            store.open_interval(
                Interval(
                    f"i-{run_id}",
                    "cpu",
                    created,
                    created + 1800,
                    cpu,
                    currency,
                    "provider",
                    run_id,
                    "provision",
                )
            )
            store.open_interval(
                Interval(
                    f"i-{run_id}",
                    "gpu",
                    created + 1800,
                    created + 5400,
                    gpu,
                    currency,
                    "watchdog",
                    run_id,
                    "boot_gpu",
                )
            )
    return store


def invoke(*args: str):
    result = CliRunner().invoke(main, ["cost", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_table_has_a_line_per_run_then_per_day_and_provider_then_per_currency(ledger):
    lines = invoke().splitlines()
    alpha = next(line for line in lines if line.startswith("alpha"))
    assert alpha.split() == [
        "alpha",
        "emulator",
        "succeeded",
        "1.000",
        "0.500",
        "2.1500",
        "0.0500",
        "2.2000",
        "CNY",
    ]
    days = [line.split() for line in lines if line[:4] == "2026"]
    assert days == [
        ["2026-11-28", "emulator", "1.000", "0.500", "2.2000", "CNY"],
        ["2026-11-29", "aws", "1.000", "0.500", "0.5676", "USD"],
        ["2026-11-29", "emulator", "1.000", "0.500", "2.2000", "CNY"],
    ]
    assert [line for line in lines if line.startswith("total")] == ["total 4.4000 CNY", "total 0.5676 USD"]


def test_a_period_keeps_the_runs_created_in_it(ledger):
    rows = list(csv.DictReader(io.StringIO(invoke("--since", "2026-11-29", "--csv"))))
    assert sorted(row["run_id"] for row in rows) == ["beta", "gamma"]
    rows = list(csv.DictReader(io.StringIO(invoke("--until", "2026-11-29", "--csv"))))
    assert [(row["run_id"], row["total"]) for row in rows] == [("alpha", "2.2")]


def test_json_is_one_document_with_totals_that_never_mix_currencies(ledger):
    report = json.loads(invoke("--json"))
    assert report["totals"] == [
        {"currency": "CNY", "gpu_hours": 2.0, "cpu_hours": 1.0, "total": 4.4},
        {"currency": "USD", "gpu_hours": 1.0, "cpu_hours": 0.5, "total": 0.5676},
    ]


def test_a_runs_timeline_names_phase_mode_and_witness(ledger):
    lines = invoke("gamma").splitlines()
    assert lines[1].split() == ["provision", "cpu", "1800.0", "0.083", "0.0416", "provider"]
    assert lines[2].split() == ["boot_gpu", "gpu", "3600.0", "0.526", "0.5260", "watchdog"]
    assert lines[-1] == "total 0.5676 USD"
