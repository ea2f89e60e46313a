"""Loss charts: the PNG is a real chart of the right size, its CSV holds the numbers of the
metrics file, and the sparkline follows the curve."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from runner.plot import chart_run, read_curves, run_title, sparkline

pytestmark = pytest.mark.unit


def metrics_file(folder: Path, steps: int = 30) -> Path:
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 3.0 / step, "lr": 1e-3 * min(1.0, step / 5), "tokens": 64 * step})
        if step % 10 == 0:
            lines.append({"step": step, "val_loss": 3.5 / step})
    path = folder / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 31, "lo', encoding="utf-8")
    return path


def test_the_chart_and_its_csv_match_the_metrics(tmp_path):
    metrics = metrics_file(tmp_path)
    (tmp_path / "cost.json").write_text(json.dumps({"totals": [{"total": 0.0283, "currency": "CNY"}]}))
    recorded = {"run_id": "smoke-1", "trainer": {"config": {"checkpoint_dir": "/data/llama-7b"}}}
    png = chart_run(tmp_path, recorded)

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 450)
    assert len(data) > 10_000  # lines, axes and labels, not an empty canvas

    rows = list(csv.DictReader((tmp_path / "loss.csv").open(encoding="utf-8")))
    expected = [
        json.loads(line) for line in metrics.read_text().splitlines()[:-1]
    ]  # the partial line dropped
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert {int(r["step"]): float(r["loss"]) for r in rows} == {
        e["step"]: e["loss"] for e in expected if "loss" in e
    }
    assert {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]} == {
        e["step"]: e["val_loss"] for e in expected if "val_loss" in e
    }
    assert {int(r["step"]): float(r["lr"]) for r in rows} == {
        e["step"]: e["lr"] for e in expected if "lr" in e
    }


def test_the_title_names_run_model_and_cost():
    config = {"checkpoint_dir": "/data/llama-7b", "lora_r": 8, "lora_targets": ["q", "v"]}
    recorded = {"run_id": "smoke-1", "trainer": {"config": config}}
    cost = {"totals": [{"total": 0.0283, "currency": "CNY"}]}
    assert run_title(recorded, cost) == "smoke-1 · llama-7b · LoRA r8 on q,v · 0.0283 CNY"
    recorded["trainer"]["environment"] = {"model": {"base_params": 6_738_415_616}}
    assert run_title(recorded, None) == "smoke-1 · 6.7B parameters · LoRA r8 on q,v"
    assert run_title({"run_id": "local-1"}, None) == "local-1"


def test_a_run_without_losses_gets_no_chart(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens_per_s": 5}\n')
    assert chart_run(tmp_path, {"run_id": "r"}) is None and not (tmp_path / "loss.png").exists()
    assert read_curves(tmp_path / "missing.jsonl", "r").empty


def test_the_sparkline_follows_the_curve_within_its_width():
    falling = [3.0 / step for step in range(1, 101)]
    line = sparkline(falling, width=20)
    assert len(line) == 20 and line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, reverse=True)  # never rises
    assert sparkline([1.0, 1.0]) == "▁▁" and sparkline([]) == ""
