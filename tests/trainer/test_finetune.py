"""Fine-tuning: schedule and batching, and the whole pipeline run as the smoke job runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import trainer
from trainer.batching import collate
from trainer.data import IGNORE_INDEX
from trainer.finetune import TrainConfig, lr_at

pytestmark = pytest.mark.unit

REPO = Path(trainer.__file__).resolve().parents[1]


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"checkpoint_dir": "c", "data_dir": "d", "out_dir": "o", **overrides})


def test_warm_up_then_cosine_to_a_tenth():
    cfg = config(lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_collate_pads_to_the_longest_sample_and_shifts():
    rows = [
        {"input_ids": torch.tensor([1, 5, 6, 2]), "labels": torch.tensor([-100, 5, 6, 2])},
        {"input_ids": torch.tensor([1, 7, 2]), "labels": torch.tensor([-100, 7, 2])},
    ]
    batch = collate(rows)
    assert batch.inputs.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch.targets.tolist() == [[5, 6, 2], [7, 2, IGNORE_INDEX]]
    assert batch.tokens == 5


@pytest.mark.parametrize(
    "bad", [dict(warmup_steps=100, max_steps=100), dict(precision="fp16"), dict(lora_r=0)]
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        config(**bad)


def run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", *args, "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def finetune(data: Path, out: Path) -> dict:
    return run(
        "trainer.finetune",
        "--checkpoint-dir",
        str(data / "checkpoint"),
        "--data-dir",
        str(data / "prepared"),
        "--out",
        str(out),
        "--max-steps",
        "40",
        "--micro-batch-size",
        "8",
        "--lr",
        "3e-3",
        "--eval-interval",
        "20",
        "--seed",
        "7",
    )


def test_pipeline_learns_and_is_reproducible(tmp_path):
    data = tmp_path / "data"
    records, tok = str(data / "instructions.json"), str(data / "tokenizer.model")
    run("trainer.synthetic", "--out", records, "--count", "300", "--seed", "7")
    run("trainer.tokenizer", "train", "--input", records, "--vocab-size", "600", "--out", tok)
    run(
        "trainer.init_model",
        "--config",
        "tiny",
        "--tokenizer",
        tok,
        "--out",
        str(data / "checkpoint"),
        "--seed",
        "7",
    )
    manifest = run(
        "trainer.prepare",
        "--input",
        records,
        "--tokenizer",
        str(data / "checkpoint" / "tokenizer.model"),
        "--out",
        str(data / "prepared"),
        "--max-seq-length",
        "128",
        "--test-size",
        "30",
        "--seed",
        "7",
    )
    assert (manifest["train"], manifest["test"], manifest["dropped"]) == (270, 30, 0)

    summary = finetune(data, tmp_path / "run1")
    lines = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").open()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == summary["steps"] == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert [line["step"] for line in lines if "val_loss" in line] == [20, 40]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s"} <= set(lines[0])

    with safe_open(tmp_path / "run1" / "lora.safetensors", framework="pt") as adapters:
        keys = set(adapters.keys())
        lora_config = json.loads(adapters.metadata()["lora_config"])
    assert keys and all(k.endswith((".lora_a", ".lora_b")) for k in keys)
    assert len(keys) == 2 * 2 * 2  # two layers, q and v, A and B
    assert lora_config["targets"] == ["q", "v"]

    finetune(data, tmp_path / "run2")
    first = (tmp_path / "run1" / "lora.safetensors").read_bytes()
    assert (tmp_path / "run2" / "lora.safetensors").read_bytes() == first
