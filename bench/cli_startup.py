"""Start-up cost of the `runner` command, against a bare Python start in the same run.

Prints one JSON line per measurement and a one-line summary. The controller must never
import torch, boto3 or docker at start-up; that is checked here too (and reported).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEATS = int(os.environ.get("BENCH_REPEATS", "15"))
HEAVY = ("torch", "boto3", "docker", "paramiko")


def median_seconds(argv: list[str], env: dict[str, str]) -> float:
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True, cwd=REPO)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def heavy_imports(args: list[str], env: dict[str, str]) -> list[str]:
    """Which heavy modules a command imports, seen through Python's own import log."""
    probe = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runner", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in probe.stderr.splitlines()}
    return sorted(loaded & set(HEAVY))


def main() -> None:
    env = {**os.environ, "RUNNER_HOME": tempfile.mkdtemp(prefix="runner-bench-")}
    baseline = median_seconds([sys.executable, "-c", "pass"], env)
    print(json.dumps({"command": "python -c pass", "median_s": round(baseline, 4), "repeats": REPEATS}))
    results = {}
    for label, args in (("runner --help", ["--help"]), ("runner validate", ["validate", "jobs/smoke.yaml"])):
        seconds = median_seconds([sys.executable, "-m", "runner", *args], env)
        heavy = heavy_imports(args, env)
        results[label] = seconds
        print(
            json.dumps(
                {
                    "command": label,
                    "median_s": round(seconds, 4),
                    "ratio_to_python": round(seconds / baseline, 2),
                    "over_python_s": round(seconds - baseline, 4),
                    "heavy_imports": heavy,
                }
            )
        )
    summary = ", ".join(f"{k} {v:.3f}s ({v / baseline:.1f}x python)" for k, v in results.items())
    print(f"summary: python -c pass {baseline:.3f}s; {summary}; target < 0.3 s each")


if __name__ == "__main__":
    main()
