"""Training checkpoints and resuming: a stopped run, continued, ends exactly where an
uninterrupted one does, on a model small enough to train in well under a second."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainer
from trainer.checkpoint import save_model
from trainer.data import IGNORE_INDEX
from trainer.finetune import TrainConfig, main, train
from trainer.model import Config, LLaMA
from trainer.train_state import ResumeError

REPO = Path(trainer.__file__).resolve().parents[1]
TIMING = ("tokens_per_s", "elapsed_s", "peak_mem_gib")


def write_tiny_inputs(root: Path, train_size: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """A 2-layer, 32-wide base checkpoint and prepared data of varied lengths, in `root`.

    Each sample counts upwards from a random start, so there is something to learn."""
    torch.manual_seed(seed)
    config = Config(
        vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64
    )
    save_model(LLaMA(config), root / "checkpoint")
    data = root / "prepared"
    data.mkdir()
    generator = torch.Generator().manual_seed(seed)

    def rows(n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(n):
            length = int(torch.randint(6, 40, (), generator=generator))
            start = int(torch.randint(0, 64, (), generator=generator))
            ids = (torch.arange(length) + start) % 60 + 4
            labels = ids.clone()
            labels[: length // 3] = IGNORE_INDEX  # a "prompt" without loss
            out.append({"input_ids": ids, "labels": labels})
        return out

    torch.save(rows(train_size), data / "train.pt")
    torch.save(rows(8), data / "test.pt")
    (data / "prepare.json").write_text(json.dumps({"max_seq_length": 64}))
    return root / "checkpoint", data


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, here and in the subprocesses: a tiny model gains nothing from more, and
    bitwise comparisons need the same thread count on both sides."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_inputs(tmp_path_factory.mktemp("tiny"))


def tiny_config(inputs: tuple[Path, Path], out: Path, **overrides) -> TrainConfig:
    checkpoint, data = inputs
    settings = dict(
        micro_batch_size=4,
        grad_accum=2,
        max_steps=12,
        warmup_steps=2,
        lr=1e-2,
        weight_decay=0.01,
        eval_interval=5,
        eval_samples=8,
        save_interval=4,
        keep_checkpoints=2,
        seed=3,
        device="cpu",
    )
    return TrainConfig(str(checkpoint), str(data), str(out), **{**settings, **overrides})


def metrics_without_timing(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def adapters(out: Path) -> bytes:
    return (out / "lora.safetensors").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(inputs, out), lambda _: None)
    return out


@pytest.mark.unit
def test_checkpoints_are_periodic_and_pruned(uninterrupted):
    root = uninterrupted / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000008", "step-000012"]
    assert (root / "latest").read_text().strip() == "step-000012"
    step = root / "step-000008"
    assert {"lora.safetensors", "optimizer.pt", "trainer_state.pt", "train_config.json"} <= {
        p.name for p in step.iterdir()
    }
    state = torch.load(step / "trainer_state.pt", weights_only=True)
    assert state["step"] == 8 and state["world_size"] == 1
    lines = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[state["metrics_lines"] - 1])["step"] == 8
    assert json.loads((step / "train_config.json").read_text())["seed"] == 3


@pytest.mark.unit
def test_resuming_an_older_checkpoint_reproduces_the_rest_bitwise(inputs, uninterrupted, tmp_path):
    """From step 8 of a copy of the finished run: the metrics past step 8 are cut and written again."""
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    (out / "lora.safetensors").unlink()
    summary = train(tiny_config(inputs, out), lambda _: None, str(out / "checkpoints" / "step-000008"))
    assert summary["steps"] == 12 and summary["stopped"] is None
    assert adapters(out) == adapters(uninterrupted)
    assert metrics_without_timing(out) == metrics_without_timing(uninterrupted)


@pytest.mark.unit
def test_a_signal_stops_after_the_step_and_resume_reproduces_bitwise(inputs, uninterrupted, tmp_path):
    out = tmp_path / "stopped"

    def stop_at_step_5(line: str) -> None:
        if line.startswith("step 5/"):
            signal.raise_signal(signal.SIGTERM)

    cfg = tiny_config(inputs, out, save_interval=0)
    summary = train(cfg, stop_at_step_5)
    assert (summary["stopped"], summary["steps"]) == ("SIGTERM", 6)
    assert Path(summary["checkpoint"]).name == "step-000006"
    assert (out / "lora.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

    summary = train(cfg, lambda _: None, "auto")
    assert summary["steps"] == 12 and summary["resumed_from"].endswith("step-000006")
    assert adapters(out) == adapters(uninterrupted)
    assert metrics_without_timing(out) == metrics_without_timing(uninterrupted)


@pytest.mark.unit
def test_resume_refuses_changed_settings_and_names_them(inputs, uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    with pytest.raises(ResumeError, match=r"lr \(0\.01 -> 0\.02\), seed \(3 -> 4\)"):
        train(tiny_config(inputs, out, lr=2e-2, seed=4), lambda _: None, "auto")
    # what may change does not stop it: here a longer run, checkpointed less often
    summary = train(tiny_config(inputs, out, max_steps=14, save_interval=7, log_interval=2), print, "auto")
    assert (summary["resumed_from"], summary["steps"]) == (str(out / "checkpoints" / "step-000012"), 14)


@pytest.mark.unit
def test_cli_refuses_bad_resumes_in_one_line(inputs, uninterrupted, capsys):
    checkpoint, data = inputs
    args = ["--checkpoint-dir", str(checkpoint), "--data-dir", str(data), "--out", str(uninterrupted)]
    assert main([*args, "--device", "cpu"]) == 2  # a fresh start over existing checkpoints
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--resume" in err
    assert main([*args, "--resume", str(uninterrupted / "missing")]) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err


@pytest.mark.unit
def test_resume_auto_without_a_checkpoint_starts_fresh(inputs, tmp_path):
    lines: list[str] = []
    summary = train(tiny_config(inputs, tmp_path, max_steps=3, save_interval=0), lines.append, "auto")
    assert summary["steps"] == 3 and summary["resumed_from"] is None
    assert any(line.startswith("no checkpoint in") for line in lines)
    assert not (tmp_path / "checkpoints").exists()


def finetune_command(inputs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    checkpoint, data = inputs
    return [
        sys.executable,
        "-m",
        "trainer.finetune",
        *("--checkpoint-dir", str(checkpoint), "--data-dir", str(data), "--out", str(out)),
        *("--micro-batch-size", "4", "--max-steps", "500", "--lr", "1e-3", "--save-interval", "50"),
        *("--eval-interval", "100", "--eval-samples", "4", "--device", "cpu", "--seed", "5", *extra),
    ]


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max((line["step"] for line in lines), default=0)


@pytest.mark.e2e
def test_sigterm_saves_exits_0_and_the_resumed_run_matches(inputs, tmp_path, capsys):
    """The whole story in real processes: SIGTERM mid-run, exit 0 within seconds with a
    checkpoint, then --resume to the end, bit-identical to a run never interrupted."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(finetune_command(inputs, stopped), env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while steps_logged(stopped) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - signalled < 10
    assert "stopped by SIGTERM" in err and "--resume" in err
    step = steps_logged(stopped)
    assert 3 <= step < 500
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"

    assert main(finetune_command(inputs, stopped, "--resume")[3:]) == 0
    assert f"resuming from {stopped / 'checkpoints' / f'step-{step:06d}'}" in capsys.readouterr().err

    reference = tmp_path / "reference"
    assert main(finetune_command(inputs, reference)[3:]) == 0
    assert adapters(stopped) == adapters(reference)
    assert metrics_without_timing(stopped) == metrics_without_timing(reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs the right to mount, as root in CI has)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.unit
def test_a_disk_full_while_checkpointing_fails_clearly_and_keeps_the_last_good_checkpoint(
    inputs, uninterrupted, small_disk, tmp_path
):
    out = small_disk / "out"
    filler = small_disk / "filler"

    def fill_after_the_first_checkpoint(line: str) -> None:
        if line.startswith("step 5/") and not filler.exists():  # step 4's checkpoint is saved
            free = shutil.disk_usage(small_disk).free
            filler.write_bytes(b"\0" * (free - 8192))  # room for metrics lines, not a checkpoint

    from trainer.train_state import CheckpointSpaceError

    with pytest.raises(CheckpointSpaceError) as raised:
        train(tiny_config(inputs, out, log_interval=1), fill_after_the_first_checkpoint)
    message = raised.value.strerror
    assert "no space left in" in message and "checkpoint of step 8" in message
    assert "the last complete one is step 4" in message
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004"]  # nothing half-written
    assert (root / "latest").read_text() == "step-000004\n"

    filler.unlink()  # space again: resuming from the kept checkpoint ends where an uninterrupted run does
    moved = tmp_path / "out"
    shutil.copytree(out, moved)
    summary = train(tiny_config(inputs, moved), lambda _: None, resume_from="auto")
    assert summary["resumed_from"].endswith("step-000004")
    assert adapters(moved) == adapters(uninterrupted)
