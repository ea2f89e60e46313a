"""Budgets on the emulator: an estimate over a cap is refused before anything is billed; a cap
reached during training stops the trainer (SIGTERM: it checkpoints), the instance powers off,
the checkpoint comes home and the run ends with exit code 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.emulator.cloud import admin, intervals, submit, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CAP_H = 0.004  # 14.4 s of GPU time
TRAIN = (
    "trap 'echo checkpoint > /out/ckpt-final; exit 0' TERM;"
    ' i=0; while :; do i=$((i + 1)); echo "{\\"step\\": $i}" >> /out/metrics.jsonl; sleep 0.5; done'
)


def test_a_cap_reached_while_training_stops_it_keeps_the_checkpoint_and_exits_4(cloud, tmp_path, tiny_image):
    spec = tiny_job(tmp_path, tiny_image, "budget-cap", TRAIN)
    text = spec.read_text().replace("outputs: [/out/result]", "outputs: [/out/ckpt-final]")
    spec.write_text(text + f"budget: {{max_gpu_hours: {CAP_H}}}\nwatchdog: {{interval_s: 1}}\n")
    code, payload, stderr = submit(cloud, spec)
    assert code == 4, stderr[-4000:]
    assert payload["error"].startswith(
        "the watchdog stopped training: budget: the run's GPU time or cost cap"
    )
    assert (Path(payload["run_dir"]) / "artifacts" / "ckpt-final").read_text() == "checkpoint\n"
    log = intervals(cloud, payload["run_id"])
    gpu = [i for i in log if i["mode"] == "gpu"]
    assert len(gpu) == 1 and all(i["ended_at"] for i in log)
    assert gpu[0]["seconds"] <= CAP_H * 3600 + 1 + 5  # the cap, a watchdog interval, the power-off


def test_an_estimate_over_the_cap_is_refused_before_anything_is_billed(cloud, tmp_path, tiny_image):
    before = len(admin(cloud, "/emulator/v1/power_log"))
    spec = tiny_job(tmp_path, tiny_image, "budget-estimate", "true")
    budget = "pricing: {gpu_per_hour: 2.15}\nbudget: {max_cost: 1, expected_gpu_hours: 2}\n"
    spec.write_text(spec.read_text() + budget)
    code, payload, stderr = submit(cloud, spec)
    assert code == 4
    assert (
        payload["error"]
        == "estimated 4.30 CNY: 2 GPU h at 2.15/h + 0 no-GPU h at 0/h, over budget.max_cost 1"
    )
    assert json.dumps(payload["phases"]).count('"provision"') == 0
    assert len(admin(cloud, "/emulator/v1/power_log")) == before


def test_a_gpu_priced_over_max_hourly_price_is_never_booted(cloud, tmp_path, tiny_image):
    """The spec's own rates pass validation; the emulator's reported price (2.15/h) does not."""
    before = len(admin(cloud, "/emulator/v1/power_log"))
    spec = tiny_job(tmp_path, tiny_image, "budget-price", "true")
    spec.write_text(spec.read_text() + "budget: {max_hourly_price: 2}\n")
    code, payload, stderr = submit(cloud, spec)
    assert code == 4, stderr[-4000:]
    assert payload["error"].endswith("puts the GPU at 2.15 CNY/h, over budget.max_hourly_price 2")
    assert payload["error"].startswith("emulator instance ")
    assert [p["name"] for p in payload["phases"] if p["status"] == "failed"] == ["provision"]
    assert len(admin(cloud, "/emulator/v1/power_log")) == before  # no boot in either mode
