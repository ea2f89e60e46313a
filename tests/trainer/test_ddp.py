"""Data parallelism: two CPU processes under torchrun (Gloo) train as one process does with the
same global batch. Slow for a unit test (three Python processes start), bounded by a timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer
from tests.trainer.test_resume import write_tiny_inputs
from trainer.finetune import main

pytestmark = pytest.mark.e2e

REPO = Path(trainer.__file__).resolve().parents[1]
STEPS = 8


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [line["loss"] for line in metrics(out) if "loss" in line]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each worker
    yield
    torch.set_num_threads(threads)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, one_thread):
    checkpoint, data = write_tiny_inputs(tmp_path)
    common = ["--checkpoint-dir", str(checkpoint), "--data-dir", str(data), "--micro-batch-size", "4"]
    common += ["--max-steps", str(STEPS), "--warmup-steps", "2", "--lr", "1e-2", "--lora-dropout", "0"]
    common += ["--eval-interval", "4", "--save-interval", "4", "--device", "cpu"]
    parallel = tmp_path / "parallel"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            *("-m", "trainer.finetune", *common, "--out", str(parallel), "--grad-accum", "1"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("training ") == 1  # rank 0 alone logs
    assert [line["step"] for line in metrics(parallel)] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert (parallel / "lora.safetensors").exists()
    state = torch.load(parallel / "checkpoints" / "step-000008" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    single = tmp_path / "single"
    assert main([*common, "--out", str(single), "--grad-accum", "2"]) == 0
    assert losses(parallel) == pytest.approx(losses(single), rel=1e-4)
    assert losses(parallel)[-1] < losses(parallel)[0]
    ours, theirs = load_file(parallel / "lora.safetensors"), load_file(single / "lora.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-5)
