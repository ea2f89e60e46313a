"""The state of a training run: checkpoints, the metrics log, stop signals. Everything a stopped
run needs to continue as if it had never stopped.

OUT/checkpoints/step-NNNNNN/
    lora.safetensors    the adapters, as `trainer.lora.save_adapters` writes them (usable as they are)
    optimizer.pt        AdamW's state
    trainer_state.pt    step (the learning-rate schedule's position), batch sampler position,
                        random states of every process, metrics.jsonl line count, elapsed time
    train_config.json   the TrainConfig of the run
OUT/checkpoints/latest  the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
the same way, so a run killed at any moment leaves either the old or the new checkpoint, never a
half-written one. The .pt files hold tensors and plain values only, so they load with
`torch.load(weights_only=True)`, which cannot run code from the file.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from trainer.lora import ADAPTER_FILE, LoRAConfig, Provenance, save_adapters

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.pt"
CONFIG = "train_config.json"

# TrainConfig fields a resumed run may change: how long it goes on, how often it reports or saves,
# and where it writes. Anything else would make the continuation a different run.
RESUMABLE_CHANGES = (
    "max_steps",
    "save_interval",
    "keep_checkpoints",
    "eval_interval",
    "log_interval",
    "out_dir",
)

_STEP_DIR = re.compile(r"step-(\d+)")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from as asked, or one in the way of a fresh start."""


class CheckpointSpaceError(OSError):
    """The disk filled up while a checkpoint was written; the half-written one is gone."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state: dict[str, Any]
    optimizer: dict[str, Any]
    adapters: dict[str, torch.Tensor]


@dataclass
class Progress:
    """Where a run stands; saved in its checkpoints."""

    step: int = 0
    metrics_lines: int = 0  # lines in metrics.jsonl up to and including this step's
    elapsed_s: float = 0.0  # wall time spent training, by this process and those before it


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    lora: LoRAConfig,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    provenance: Provenance | None = None,
) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically, point `latest` at it, and keep the `keep`
    newest checkpoints up to this step. Any checkpoint past this step belongs to a run that was
    resumed from an earlier point, and is removed."""
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    try:
        tmp.mkdir()
        save_adapters(model, lora, tmp, provenance)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(state, tmp / STATE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for path in tmp.iterdir():
            _fsync(path)
    except Exception as exc:  # torch and safetensors report a full disk as errors of their own
        full = _out_of_space(exc, root)  # asked before the half-written files free their space
        shutil.rmtree(tmp, ignore_errors=True)  # never taken for a checkpoint
        if not full:
            raise
        last = checkpoint_steps(root)
        raise CheckpointSpaceError(
            errno.ENOSPC,
            f"no space left in {root} to save the checkpoint of step {step}; the last complete"
            f" one is {f'step {last[-1]}' if last else 'none'} (free some space, then resume)",
        ) from exc
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomically(root / LATEST, final.name + "\n")
    _fsync(root)
    steps = checkpoint_steps(root)
    kept = [s for s in steps if s <= step][-keep:]
    for s in steps:
        if s not in kept:
            shutil.rmtree(root / f"step-{s:06d}")
    return final


def _out_of_space(exc: BaseException, root: Path) -> bool:
    """Whether a failed write failed for want of space (torch hides the errno in its message)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return shutil.disk_usage(root).free < 1 << 20


def checkpoint_steps(root: Path) -> list[int]:
    """The steps of the complete checkpoints under `root`, in order."""
    if not root.is_dir():
        return []
    matches = (_STEP_DIR.fullmatch(path.name) for path in root.iterdir() if path.is_dir())
    return sorted(int(m.group(1)) for m in matches if m)


def find_checkpoint(out_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    `resume` None: start fresh, but refuse to when OUT already holds checkpoints, which the new
    run would overwrite. "auto": OUT/checkpoints/latest, or a fresh start when there is none,
    so one command serves the first attempt and every retry. Otherwise a path: a step folder,
    or a checkpoints folder whose `latest` names one."""
    root = out_dir / CHECKPOINTS
    if resume is None:
        if (root / LATEST).exists():
            raise ResumeError(
                f"{root} holds checkpoints of an earlier run (latest {_read_latest(root).name}); "
                "pass --resume to continue it, or choose another --out"
            )
        return None
    if resume == "auto":
        if not (root / LATEST).exists():
            return None
        path = root
    else:
        path = Path(resume)
    if (path / LATEST).exists():
        path = _read_latest(path)
    if not (path / STATE).is_file():
        raise ResumeError(f"{path} is not a training checkpoint: it has no {STATE}")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    return Checkpoint(
        path=path,
        config=json.loads((path / CONFIG).read_text()),
        state=torch.load(path / STATE, map_location="cpu", weights_only=True),
        optimizer=torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True),
        adapters=load_file(path / ADAPTER_FILE),
    )


def check_resumable(saved: dict[str, Any], given: dict[str, Any], path: Path) -> None:
    """Refuse to continue a run under settings that would make it a different run."""
    # Both through JSON, so a tuple in one and a list in the other compare equal.
    saved, given = json.loads(json.dumps(saved)), json.loads(json.dumps(given))
    changed = [
        f"{name} ({saved.get(name)!r} -> {given.get(name)!r})"
        for name in sorted(set(saved) | set(given))
        if name not in RESUMABLE_CHANGES and saved.get(name) != given.get(name)
    ]
    if changed:
        raise ResumeError(
            f"cannot resume from {path}: the settings differ in {', '.join(changed)}; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change when resuming"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states; dropout draws from torch's, on the CPU or the GPU."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def truncate_lines(path: Path, keep: int) -> int:
    """Cut a JSON-lines file back to its first `keep` lines (atomically); return how many it now has.
    A file shorter than that, e.g. in a new output folder, is kept as it is."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    kept = [line for line in lines[:keep] if line.endswith("\n")]  # not a line cut off by a kill
    _write_atomically(path, "".join(kept))
    return len(kept)


def _read_latest(root: Path) -> Path:
    path = root / (root / LATEST).read_text().strip()
    if not path.is_dir():
        raise ResumeError(f"{root / LATEST} names {path.name}, which does not exist")
    return path


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never lands before the data it names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StopSignal:
    """SIGTERM or SIGINT asks the run to stop after its current optimizer step. Later signals
    change nothing (SIGKILL still ends a run at once): under torchrun a Ctrl-C reaches every
    process twice, from the terminal and from torchrun, and must not cut the checkpoint short.
    The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = self.received or signal.Signals(signum).name


class Metrics:
    """OUT/metrics.jsonl, written by rank 0 alone; counts its lines so that a checkpoint can record
    where the file stood."""

    def __init__(self, path: Path, lines: int, enabled: bool) -> None:
        self.path, self.lines, self.enabled = path, lines, enabled
        self.stream: IO[str] | None = None

    def __enter__(self) -> Metrics:
        if self.enabled:
            self.stream = open(self.path, "a")  # noqa: SIM115 (closed in __exit__)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self.stream.close()

    def write(self, record: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
            self.lines += 1
