"""GPU-mode seconds a run pays for without training, measured on the emulator.

The product's promise is that the GPU boot is used for training and little else: images,
inputs, downloads and set-up steps run on the no-GPU boot. This runs the smoke job on a fresh
emulator (`runner emulator up`, then `runner submit jobs/smoke-emulated.yaml`) and splits the
run's GPU-mode interval, from the emulator's own power log, into the train command's time (the
train step's `container.exited` event against the train phase's start) and the rest, minus the
emulator's configured boot delay. Target: at most 15 s of GPU-mode overhead per run. Also
prints the no-GPU-mode seconds of the whole run. Run from the repository root:
`.venv/bin/python -m bench.gpu_overhead [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from runner.store import Store
from tests.emulator.cloud import BASE_IMAGE, REPO, intervals, runner, submit

TARGET_S = 15.0


def measure(env: dict, spec: Path, boot_delay: float) -> dict:
    code, payload, stderr = submit(env, spec)
    if code != 0:
        raise SystemExit(f"the run failed ({code}): {stderr[-2000:]}")
    run_id = payload["run_id"]
    cpu, gpu, collect = intervals(env, run_id)  # set-up, training, collecting
    with Store(Path(env["RUNNER_HOME"])) as store:
        train = next(p for p in store.phases(run_id) if p.name == "train" and p.status == "succeeded")
        (trained,) = [
            e for e in store.events(run_id) if e.kind == "container.exited" and e.data["name"] == "train"
        ]
    train_command_s = trained.ts - train.started_at
    return {
        "run_id": run_id,
        "gpu_mode_s": round(gpu["seconds"], 2),
        "train_command_s": round(train_command_s, 2),
        "gpu_overhead_s": round(gpu["seconds"] - train_command_s - boot_delay, 2),
        "no_gpu_mode_s": round(cpu["seconds"] + collect["seconds"], 2),
        "cost": round(cpu["cost"] + gpu["cost"] + collect["cost"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--boot-delay", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu-overhead-") as scratch:
        env = {**os.environ, "RUNNER_HOME": f"{scratch}/home", "RUNNER_EMULATOR_BASE": BASE_IMAGE}
        up = runner(env, "emulator", "up", "--boot-delay", str(args.boot_delay), "--cpu-mode-cpus", "2")
        if up.returncode != 0:
            raise SystemExit(up.stderr)
        spec = Path(scratch) / "smoke-emulated.yaml"
        text = (REPO / "jobs" / "smoke-emulated.yaml").read_text(encoding="utf-8")
        spec.write_text(text.replace("context: ..", f"context: {REPO}"), encoding="utf-8")
        try:
            rows = [measure(env, spec, args.boot_delay) for _ in range(args.runs)]
        finally:
            runner(env, "emulator", "down", "--purge")
            subprocess.run(
                ["docker", "rmi", "runner/smoke-emulated:latest"], capture_output=True, timeout=120
            )
    for row in rows:
        print(json.dumps(row))
    worst = max(row["gpu_overhead_s"] for row in rows)
    met = "yes" if worst <= TARGET_S else "no"
    print(
        f"GPU-mode overhead (boot delay {args.boot_delay:g} s excluded): worst {worst:.1f} s"
        f" of {len(rows)} run(s);"
        f" target <= {TARGET_S:g} s: {met}; no-GPU mode {rows[-1]['no_gpu_mode_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
