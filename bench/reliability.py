"""The reliability scoreboard: run the bad-input, fault and security suites, count what held.

Each suite is a pytest folder; every test case is one bad input tried, one fault scenario or
one security check. The scoreboard prints a table and one JSON line:

  bad inputs tried / handled      tests/bad_inputs (exit code, one line, no state changed)
  fault scenarios run / survived  tests/faults, where it exists
  security checks passed          tests marked `security` in any of them
  artifacts lost, GPU overrun     what the fault scenarios measured (tests/faults/checks.py):
                                  artifacts whose sha256 no longer held, and the most seconds
                                  a GPU-mode boot outlived training

Run from the repository root: `.venv/bin/python -m bench.reliability [--full]` (--full also
runs the slow fault scenarios, as RUNNER_FAULTS=full does for pytest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from tests.faults.checks import RECORD_ENV, WATCHDOG_BOUND_S

REPO = Path(__file__).resolve().parents[1]
SUITES = {"bad inputs": "tests/bad_inputs", "fault scenarios": "tests/faults"}


@dataclass
class Tally:
    tried: int = 0
    held: int = 0
    failed: tuple[str, ...] = ()


@dataclass
class Figures:
    artifacts: int = 0
    artifacts_lost: int = 0
    gpu_overrun_s: float = 0.0


def read_figures(path: Path) -> Figures:
    """Sum what the fault checks recorded (one JSON line per check)."""
    figures = Figures()
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for entry in map(json.loads, lines):
        figures.artifacts += entry.get("artifacts", 0)
        figures.artifacts_lost += entry.get("artifacts_lost", 0)
        figures.gpu_overrun_s = max(figures.gpu_overrun_s, entry.get("gpu_overrun_s", 0.0))
    return figures


def run_suite(folder: str, marker: str | None, env: dict[str, str]) -> Tally:
    """Run one pytest folder (optionally one marker) and count its cases from the JUnit report."""
    if not (REPO / folder).is_dir():
        return Tally()
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.xml"
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            folder,
        ]
        if marker:
            argv += ["-m", marker]
        subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        if not report.exists():
            return Tally()
        cases = ElementTree.parse(report).getroot().iter("testcase")
        outcomes = {f"{c.get('classname')}::{c.get('name')}": _outcome(c) for c in cases}
    ran = {name: why for name, why in outcomes.items() if why is not None}
    failed = tuple(sorted(f"{name}: {why}" for name, why in ran.items() if why))
    return Tally(len(ran), sum(1 for why in ran.values() if not why), failed)


def _outcome(case: ElementTree.Element) -> str | None:
    """None skipped, "" passed, else the first line of why it failed or errored."""
    if case.find("skipped") is not None:
        return None
    problem = case.find("failure")
    if problem is None:
        problem = case.find("error")
    if problem is None:
        return ""
    return (problem.get("message") or "failed").splitlines()[0][:300] or "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the slow fault scenarios")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "figures.jsonl"
        env = {**os.environ, RECORD_ENV: str(record)}
        if args.full:
            env["RUNNER_FAULTS"] = "full"
        tallies = {name: run_suite(folder, None, env) for name, folder in SUITES.items()}
        figures = read_figures(record)
    security = run_suite("tests", "security", {**os.environ})
    print(f"{'suite':<18}{'tried':>7}{'held':>7}")
    for name, tally in {**tallies, "security checks": security}.items():
        print(f"{name:<18}{tally.tried:>7}{tally.held:>7}")
        for failed in tally.failed:
            print(f"  FAILED {failed}")
    print(f"artifacts checked {figures.artifacts}, lost {figures.artifacts_lost}")
    print(f"most GPU-mode seconds past training: {figures.gpu_overrun_s:.1f} (bound: {WATCHDOG_BOUND_S})")
    bad, faults = tallies["bad inputs"], tallies["fault scenarios"]
    print(
        json.dumps(
            {
                "bad_inputs_tried": bad.tried,
                "bad_inputs_handled": bad.held,
                "scenarios_run": faults.tried,
                "scenarios_survived": faults.held,
                "security_checks": security.tried,
                "security_checks_passed": security.held,
                "artifacts_checked": figures.artifacts,
                "artifacts_lost": figures.artifacts_lost,
                "max_gpu_overrun_s": figures.gpu_overrun_s,
            }
        )
    )


if __name__ == "__main__":
    main()
