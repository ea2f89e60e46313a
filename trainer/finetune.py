"""LoRA fine-tuning of a base checkpoint on data written by `trainer.prepare`.

A plain loop: AdamW on the adapters only, linear warm-up then cosine decay, micro-batches of
samples packed into full rows (or padded to their longest sample, optionally grouped by length),
gradient accumulation, as many blocks recomputed in backward as a memory budget needs, and data
parallelism when started by torchrun. Every optimizer step appends one JSON line to
OUT/metrics.jsonl; the adapters end in OUT/lora.safetensors with their LoRA config and the
prompt template in the file's metadata.
Checkpoints in OUT/checkpoints let a run that was stopped (SIGTERM, SIGINT) or lost continue
with --resume; on a CPU the continued run ends with the same adapters, bit for bit, as one that
never stopped, and the same seed always gives the same loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from trainer.batching import Batch, BatchSampler, Row, collate, draw_global_batch, loss_on, target_count
from trainer.checkpoint import load_model
from trainer.data import IGNORE_INDEX, DataError
from trainer.devices import (
    PRECISIONS,
    DeviceError,
    Dist,
    autocast,
    environment,
    init_distributed,
    keep_freed_memory,
    peak_memory_gib,
    resolve_precision,
)
from trainer.lora import (
    TARGETS,
    LoRAConfig,
    Provenance,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    save_adapters,
)
from trainer.memory import CHECKPOINTING, gib, plan
from trainer.model import LLaMA
from trainer.train_state import (
    Checkpoint,
    CheckpointSpaceError,
    Metrics,
    Progress,
    ResumeError,
    StopSignal,
    check_resumable,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_lines,
)

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides its inputs; saved as OUT/train_config.json and in
    every checkpoint."""

    checkpoint_dir: str
    data_dir: str
    out_dir: str
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")
    lr: float = 3e-4
    weight_decay: float = 0.0  # on weight matrices only (LoRA A and B), never on norms or biases
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 10
    eval_interval: int = 100
    eval_samples: int = 256  # held-out samples in each val_loss, token-weighted; 0: none
    log_interval: int = 1
    save_interval: int = 100  # 0: a checkpoint only when stopped by a signal
    keep_checkpoints: int = 2
    max_seq_length: int | None = None  # None: the value the data was prepared with
    seed: int = 1337
    grad_clip: float = 1.0  # 0 turns clipping off
    length_grouped: bool = False  # less padding, but on small data less gradient variety
    pack: bool = False  # samples packed end to end into rows of max_seq_length, attention per sample
    activation_checkpointing: str = "off"  # off, all, or auto: the fewest blocks that fit the budget
    memory_budget_gib: float | None = None  # for auto; None: the GPU's memory
    compile: bool = False  # torch.compile each block
    precision: str = "auto"  # auto, fp32, bf16-true or bf16-mixed
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    base_model: str | None = None  # the base's name for PEFT (adapter_config.json)

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval")
        for name in (*positive, "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("eval_samples", "save_interval", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be at least 0 and less than max_steps "
                f"({self.max_steps})"
            )
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, not "
                f"{self.activation_checkpointing!r}"
            )
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ValueError("memory_budget_gib must be positive")
        if self.pack and self.length_grouped:
            raise ValueError("pack and length_grouped exclude each other: packed rows are all full")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        _ = self.lora  # building the LoRA config validates its fields

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `cfg.lr`, then cosine decay to a tenth of it at `cfg.max_steps`."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    min_lr = cfg.lr / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def held_out_batches(rows: list[Row], cfg: TrainConfig) -> list[Batch]:
    """The first `eval_samples` samples of the test split in micro-batches, the same at every
    evaluation so that val_loss values compare; sorted by length, so little is padded."""
    n = cfg.micro_batch_size
    rows = sorted(rows[: cfg.eval_samples], key=lambda row: len(row["input_ids"]))
    return [collate(rows[i : i + n]) for i in range(0, len(rows), n)]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], device: torch.device, precision: str) -> float:
    """The mean loss over every target token of `batches`, each token weighing the same."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    with autocast(precision, device):
        for batch in batches:
            total += loss_on(model, batch, device, reduction="sum")
    model.train()
    targets = sum(int((batch.targets != IGNORE_INDEX).sum()) for batch in batches)
    return total.item() / targets


class Data(NamedTuple):
    train: list[Row]
    test: list[Row]
    max_seq_length: int
    template: str | None  # the prompt template the samples were prepared with, as prepare.json says


def load_data(cfg: TrainConfig, model_max: int) -> Data:
    data_dir = Path(cfg.data_dir)
    train_rows = torch.load(data_dir / "train.pt", weights_only=True)
    test_rows = torch.load(data_dir / "test.pt", weights_only=True)
    manifest_path = data_dir / "prepare.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    max_seq_length = cfg.max_seq_length
    if max_seq_length is None:
        if "max_seq_length" not in manifest:
            raise DataError(f"{manifest_path} not found: pass --max-seq-length, or prepare the data again")
        max_seq_length = manifest["max_seq_length"]
    longest = max(len(row["input_ids"]) for row in train_rows + test_rows)
    # Cutting here would cut off EOS; the data must be prepared for the length wanted.
    if longest > min(max_seq_length, model_max):
        raise DataError(
            f"samples of {longest} tokens exceed max_seq_length {max_seq_length} or the model's "
            f"{model_max}; prepare the data again with a lower --max-seq-length"
        )
    return Data(train_rows, test_rows, min(max_seq_length, model_max), manifest.get("template"))


def prepare_model(cfg: TrainConfig, device: torch.device, precision: str) -> LLaMA:
    model, _ = load_model(cfg.checkpoint_dir)
    model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16-true" else torch.float32)
    model.init_rope()  # rebuilt in float32: the cast above would have rounded the tables
    apply_lora(model, cfg.lora)
    return model.train()


def checkpointed_layers(
    model: LLaMA, cfg: TrainConfig, seq_len: int, device: torch.device, log: Callable[[str], None]
) -> int:
    """How many blocks recompute their activations in backward: none, all, or (auto) the fewest
    with which the estimated peak fits --memory-budget-gib (by default the GPU's memory)."""
    n_layer = model.config.n_layer
    if cfg.activation_checkpointing != "auto":
        return n_layer if cfg.activation_checkpointing == "all" else 0
    if cfg.memory_budget_gib is not None:
        budget = round(cfg.memory_budget_gib * 2**30)
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    else:
        raise DeviceError("--activation-checkpointing auto on a CPU needs --memory-budget-gib")
    estimate = plan(model, cfg.micro_batch_size, seq_len, cfg.pack)
    k = estimate.fewest_checkpointed(budget)
    log(
        f"activation checkpointing: {k} of {n_layer} blocks, estimated peak "
        f"{gib(estimate.peak(k)):.1f} GiB of a {gib(budget):.1f} GiB budget"
    )
    return k


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (LoRA A and B) only: vectors such as norm scales or
    biases, were any trainable, have natural values far from zero, where decay would pull them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=device.type == "cuda")


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    weight: float,
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """One optimizer step over this process's micro-batches; returns their summed loss.

    The loss is normalised by tokens, not by micro-batch: each micro-batch's summed loss is
    multiplied by `weight`, world size / target tokens of the global batch, so every target
    token weighs the same wherever it sits, and the gradient (which DDP averages over processes)
    is that of the mean loss over the global batch, as a single process would compute it."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # Under DDP, gradients are averaged over processes once per step, after the last micro-batch.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with autocast(precision, device):
                loss = loss_on(model, batch, device, reduction="sum")
            (loss * weight).backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def reduce_step(loss_sum: torch.Tensor, stop: bool, dist: Dist) -> tuple[float, bool]:
    """The step's loss summed over all processes, and whether any of them was asked to stop:
    a signal may reach the processes during different steps, so they agree here to stop together."""
    if dist.world_size == 1:
        return loss_sum.item(), stop
    packed = torch.stack(
        [loss_sum.double(), torch.tensor(float(stop), dtype=torch.float64, device=dist.device)]
    )
    torch.distributed.all_reduce(packed)
    return packed[0].item(), packed[1].item() > 0


@dataclass
class Run:
    """A run set up and ready to train: everything the loop works on."""

    cfg: TrainConfig
    dist: Dist
    precision: str
    model: LLaMA  # the adapted model; adapters, evaluation and checkpoints are taken from it
    trained: nn.Module  # what the loop calls: `model`, or `model` wrapped in DDP
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    rows: list[Row]
    targets: list[int]  # loss targets of each row
    eval_batches: list[Batch]
    progress: Progress
    resumed_from: Path | None
    provenance: Provenance  # what the adapters record besides their shape


def model_summary(model: LLaMA) -> dict:
    """The model's shape and size as the run manifest records it (the frozen base's parameters;
    the adapters are counted apart)."""
    trainable = count_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    return {
        **asdict(model.config),
        "base_params": total - trainable,
        "lora_params": trainable,
        "checkpointed_layers": model.checkpointed_layers,
    }


def setup(cfg: TrainConfig, dist: Dist, resume_from: str | None, log: Callable[[str], None]) -> Run:
    """Model, data, optimizer and batch order, fresh or as a checkpoint left them."""
    out = Path(cfg.out_dir)
    precision = resolve_precision(cfg.precision, dist.device)
    checkpoint_path = find_checkpoint(out, resume_from)
    if dist.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 adapter matmuls
    else:
        keep_freed_memory()
    # The same seed in every process gives every process the same adapters to start from...
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = prepare_model(cfg, dist.device, precision)
    if dist.world_size > 1:
        torch.manual_seed(cfg.seed + dist.rank)  # ...and each its own dropout masks
    data = load_data(cfg, model.config.max_seq_len)
    lengths = [len(row["input_ids"]) for row in data.train]
    capacity = data.max_seq_length if cfg.pack else None
    sampler = BatchSampler(lengths, cfg.micro_batch_size, cfg.seed, cfg.length_grouped, capacity)
    row_length = capacity or max(lengths) - 1
    model.checkpointed_layers = checkpointed_layers(model, cfg, row_length, dist.device, log)
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    optimizer = build_optimizer(model, cfg, dist.device)

    progress = Progress()
    if checkpoint_path is not None:
        progress = resume(load_checkpoint(checkpoint_path), cfg, model, optimizer, sampler, dist)
        log(f"resuming from {checkpoint_path} at step {progress.step}")
    elif resume_from == "auto":
        log(f"no checkpoint in {out / 'checkpoints'}; starting from the beginning")
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        recorded = {**asdict(cfg), "template": data.template}
        (out / "train_config.json").write_text(json.dumps(recorded, indent=2) + "\n")
        found = {**environment(dist.device), "model": model_summary(model)}
        (out / "environment.json").write_text(json.dumps(found, indent=2) + "\n")
        progress.metrics_lines = truncate_lines(out / METRICS, progress.metrics_lines)
    trained: nn.Module = model
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids)
    return Run(
        cfg=cfg,
        dist=dist,
        precision=precision,
        model=model,
        trained=trained,
        optimizer=optimizer,
        sampler=sampler,
        rows=data.train,
        targets=[target_count(row) for row in data.train],
        eval_batches=held_out_batches(data.test, cfg),
        progress=progress,
        resumed_from=checkpoint_path,
        provenance=Provenance(data.template, cfg.base_model),
    )


def resume(
    checkpoint: Checkpoint,
    cfg: TrainConfig,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    sampler: BatchSampler,
    dist: Dist,
) -> Progress:
    """Put the adapters, optimizer, batch order and random streams back where the checkpoint
    left them; the learning rate follows from the step."""
    check_resumable(checkpoint.config, asdict(cfg), checkpoint.path)
    state = checkpoint.state
    if state["world_size"] != dist.world_size:
        raise ResumeError(
            f"cannot resume from {checkpoint.path} with {dist.world_size} process(es): it was "
            f"written by {state['world_size']}, whose batch shares and random streams it holds"
        )
    if state["step"] > cfg.max_steps:
        raise ResumeError(f"{checkpoint.path} is at step {state['step']}, past --max-steps {cfg.max_steps}")
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as err:
        raise ResumeError(f"cannot resume from {checkpoint.path}: {err}") from err
    load_lora_state_dict(model, checkpoint.adapters)
    optimizer.load_state_dict(checkpoint.optimizer)
    set_rng_state(state["rng"][dist.rank], dist.device)
    return Progress(state["step"], state["metrics_lines"], state["elapsed_s"])


def checkpoint_now(run: Run) -> Path | None:
    """Save a training checkpoint. Every process takes part, since each has its own random
    state; rank 0 writes the checkpoint and returns its path."""
    dist = run.dist
    states: list[Any] = [rng_state(dist.device)]
    if dist.world_size > 1:
        states = [None] * dist.world_size
        torch.distributed.all_gather_object(states, rng_state(dist.device))
    if dist.rank != 0:
        return None
    state = {
        "step": run.progress.step,
        "metrics_lines": run.progress.metrics_lines,
        "elapsed_s": run.progress.elapsed_s,
        "world_size": dist.world_size,
        "sampler": run.sampler.state_dict(),
        "rng": states,
    }
    cfg = run.cfg
    return save_checkpoint(
        Path(cfg.out_dir),
        run.progress.step,
        run.model,
        cfg.lora,
        run.optimizer,
        asdict(cfg),
        state,
        cfg.keep_checkpoints,
        run.provenance,
    )


def train_step(run: Run, step: int, stop_requested: bool) -> tuple[dict[str, Any], bool]:
    """One optimizer step; returns its metrics line (less elapsed_s) and whether the processes
    agreed to stop."""
    cfg, dist = run.cfg, run.dist
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    batches = draw_global_batch(
        run.sampler, run.rows, run.targets, cfg.grad_accum, dist.rank, dist.world_size
    )
    weight = dist.world_size / batches.targets
    own = [batch.pinned() for batch in batches.own] if dist.device.type == "cuda" else batches.own
    loss_sum = optimizer_step(run.trained, run.optimizer, own, weight, cfg, dist.device, run.precision)
    loss_sum, stopping = reduce_step(loss_sum, stop_requested, dist)
    seconds = time.perf_counter() - start
    run.progress.step = step
    record = {
        "step": step,
        "loss": loss_sum / batches.targets,
        "lr": lr,
        "tokens": batches.tokens,
        "tokens_per_s": batches.tokens / seconds,
        "padding": batches.padding,
        "epoch": run.sampler.epoch,
        "peak_mem_gib": peak_memory_gib(dist.device),
    }
    return record, stopping


def evaluate_if_due(run: Run, step: int, metrics: Metrics, log: Callable[[str], None]) -> float | None:
    """val_loss every eval_interval steps and at the last, on rank 0 while the others wait."""
    cfg = run.cfg
    if not run.eval_batches or run.dist.rank != 0:
        return None
    if step % cfg.eval_interval and step != cfg.max_steps:
        return None
    val_loss = evaluate(run.model, run.eval_batches, run.dist.device, run.precision)
    metrics.write({"step": step, "val_loss": val_loss})
    log(f"step {step} val_loss {val_loss:.4f}")
    return val_loss


def fit(run: Run, stop: StopSignal, log: Callable[[str], None]) -> dict[str, Any]:
    """The training loop, from wherever the run stands to max_steps or a stop signal."""
    cfg, dist = run.cfg, run.dist
    out = Path(cfg.out_dir)
    log(
        f"training {count_trainable(run.model):,} LoRA parameters on {len(run.rows)} samples, "
        f"{dist.device} {run.precision}, {dist.world_size} process(es), global batch "
        f"{cfg.micro_batch_size * cfg.grad_accum * dist.world_size} "
        f"{'packed rows' if cfg.pack else 'samples'}"
    )
    records: list[dict[str, Any]] = []
    val_loss, saved, stopped = None, None, None
    start, elapsed_before = time.perf_counter(), run.progress.elapsed_s
    with Metrics(out / METRICS, run.progress.metrics_lines, dist.rank == 0) as metrics:
        for step in range(run.progress.step + 1, cfg.max_steps + 1):
            record, stopping = train_step(run, step, stop.received is not None)
            run.progress.elapsed_s = record["elapsed_s"] = elapsed_before + time.perf_counter() - start
            records.append(record)
            metrics.write(record)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                log(
                    f"step {step}/{cfg.max_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s padding {record['padding']:.1%} "
                    f"peak {record['peak_mem_gib']:.2f} GiB"
                )
            evaluated = evaluate_if_due(run, step, metrics, log)
            val_loss = val_loss if evaluated is None else evaluated
            run.progress.metrics_lines = metrics.lines
            if stopping or (cfg.save_interval and step % cfg.save_interval == 0):
                saved = checkpoint_now(run) or saved
            if stopping:
                stopped = stop.received or "a stop signal to another process"
                log(f"received {stopped}; stopped after step {step}")
                break
    if dist.rank == 0:
        save_adapters(run.model, cfg.lora, out, run.provenance)
    if dist.world_size > 1:
        torch.distributed.barrier()  # leave together: a process group torn down early aborts the rest
    return {
        "out": str(out),
        "steps": run.progress.step,
        "resumed_from": run.resumed_from and str(run.resumed_from),
        "stopped": stopped,
        "checkpoint": saved and str(saved),
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        "val_loss": val_loss,
        "seconds": round(time.perf_counter() - start, 3),
        "tokens": sum(r["tokens"] for r in records),
        "padding": sum(r["padding"] for r in records) / len(records) if records else None,
        "trainable_params": count_trainable(run.model),
        "device": str(dist.device),
        "precision": run.precision,
        "world_size": dist.world_size,
    }


def train(cfg: TrainConfig, log: Callable[[str], None], resume_from: str | None = None) -> dict[str, Any]:
    """Run the fine-tuning job described by `cfg`, or continue it (`resume_from`: "auto" or a
    checkpoint path, as `trainer.train_state.find_checkpoint` takes it); return its summary.
    Under torchrun every process calls this; only rank 0 logs and writes files."""
    dist = init_distributed(cfg.device)
    say = log if dist.rank == 0 else lambda _: None
    # Installed first, so that a signal during set-up too ends in a checkpoint and exit 0.
    try:
        with StopSignal() as stop:
            return fit(setup(cfg, dist, resume_from, say), stop, say)
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field; the defaults live in the dataclass alone."""
    parser = argparse.ArgumentParser(prog="python -m trainer.finetune", description=__doc__.splitlines()[0])
    defaults = {f.name: f.default for f in fields(TrainConfig)}

    def add(flag: str, dest: str, kind: Callable[[str], Any], text: str) -> None:
        default = defaults[dest]
        shown = ",".join(default) if isinstance(default, tuple) else default
        if kind is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=f"{text} (default {shown})"
            )
        else:
            parser.add_argument(flag, dest=dest, type=kind, help=f"{text} (default {shown})")

    parser.add_argument(
        "--checkpoint-dir", "--checkpoint", required=True, help="base model checkpoint folder"
    )
    parser.add_argument("--data-dir", required=True, help="folder with train.pt and test.pt")
    parser.add_argument("--out", dest="out_dir", required=True, help="output folder")
    add("--lora-r", "lora_r", int, "LoRA rank")
    add("--lora-alpha", "lora_alpha", float, "LoRA alpha; the update is scaled by alpha / r")
    add("--lora-dropout", "lora_dropout", float, "dropout on the adapter input")
    add("--lora-targets", "lora_targets", _targets, f"comma-separated, from {','.join(TARGETS)}")
    add("--lr", "lr", float, "peak learning rate")
    add("--weight-decay", "weight_decay", float, "AdamW weight decay, on weight matrices only")
    add("--micro-batch-size", "micro_batch_size", int, "samples per forward pass")
    add("--grad-accum", "grad_accum", int, "micro-batches per optimizer step and process")
    add("--max-steps", "max_steps", int, "optimizer steps")
    add("--warmup-steps", "warmup_steps", int, "linear warm-up steps")
    add("--eval-interval", "eval_interval", int, "optimizer steps between evaluations")
    add("--eval-samples", "eval_samples", int, "held-out samples per evaluation; 0: none")
    add("--log-interval", "log_interval", int, "optimizer steps between progress lines")
    add("--save-interval", "save_interval", int, "optimizer steps between checkpoints; 0: only on a signal")
    add("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept, the newest")
    add("--max-seq-length", "max_seq_length", int, "longest sample allowed; None: prepare's")
    add("--seed", "seed", int, "seed for initialisation, dropout and batch order")
    add("--grad-clip", "grad_clip", float, "gradient norm clip; 0 turns it off")
    add("--length-grouped", "length_grouped", bool, "batch samples of similar length together")
    add("--pack", "pack", bool, "pack samples into full rows, attention confined to each")
    parser.add_argument(
        "--activation-checkpointing",
        dest="activation_checkpointing",
        nargs="?",
        const="all",
        choices=CHECKPOINTING,
        help="blocks that recompute in backward: off, all (the flag alone), or auto: the fewest "
        "that fit --memory-budget-gib (default off)",
    )
    add("--memory-budget-gib", "memory_budget_gib", float, "memory for auto checkpointing; None: the GPU's")
    add("--compile", "compile", bool, "torch.compile each block")
    add("--base-model", "base_model", str, "the base model's name, for PEFT's adapter_config.json")
    add("--precision", "precision", str, "|".join(PRECISIONS))
    add("--device", "device", str, "auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue from OUT/checkpoints/latest (starting afresh if there is none), or from PATH",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return parser


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("json", "resume") and v is not None}

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        cfg = TrainConfig(**given)
    except ValueError as err:
        return _fail(err)
    try:
        summary = train(cfg, log, resume_from=args.resume)
    except (DataError, ResumeError, DeviceError) as err:
        return _fail(err)
    except CheckpointSpaceError as err:
        print(f"error: {err.strerror}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        return _fail(f"{err.filename}: no such file or folder")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(summary))
    elif summary["stopped"]:
        again = "again" if args.resume else "again with --resume"
        log(
            f"stopped by {summary['stopped']} at step {summary['steps']}; checkpoint in "
            f"{summary['checkpoint']}, adapters so far in {summary['out']}/lora.safetensors; "
            f"to continue, run the same command {again}"
        )
    elif summary["final_loss"] is None:
        log(f"done: the checkpoint is at step {summary['steps']} already; adapters in {summary['out']}")
    else:
        log(
            f"done: {summary['steps']} steps in {summary['seconds']} s, loss "
            f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, adapters in "
            f"{summary['out']}/lora.safetensors"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
