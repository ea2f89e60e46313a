"""LoRA fine-tuning of a base checkpoint on data written by `trainer.prepare`.

A plain loop: AdamW on the adapters only, linear warm-up then cosine decay, micro-batches padded
to their longest sample. Every optimizer step appends one JSON line to OUT/metrics.jsonl; the
adapters end in OUT/lora.safetensors with their LoRA config in the file's metadata.
On a CPU the same seed gives the same loss curve and bit-identical adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import torch

from trainer.batching import Batch, Row, collate, loss_on
from trainer.checkpoint import load_model
from trainer.data import DataError
from trainer.lora import TARGETS, LoRAConfig, apply_lora, count_trainable, save_adapters
from trainer.model import LLaMA


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides its inputs; saved as OUT/train_config.json."""

    checkpoint_dir: str
    data_dir: str
    out_dir: str
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")
    lr: float = 3e-4
    weight_decay: float = 0.0
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 1
    max_seq_length: int | None = None  # None: the value the data was prepared with
    seed: int = 1337
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto, fp32 or bf16
    device: str = "auto"  # auto, cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be at least 0 and less than max_steps "
                f"({self.max_steps})"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        _ = self.lora  # building the LoRA config validates its fields

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """bf16 weights where the GPU supports them, float32 otherwise; adapters are float32 always."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `cfg.lr`, then cosine decay to a tenth of it at `cfg.max_steps`."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    min_lr = cfg.lr / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def iterate_batches(data: list[Row], batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Batches forever, a fresh permutation per epoch, so each sample is seen once per epoch."""
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            yield collate([data[j] for j in order[i : i + batch_size]])


def held_out_batches(rows: list[Row], cfg: TrainConfig) -> list[Batch]:
    """The first `eval_batches` micro-batches of the test split, the same at every evaluation
    so that val_loss values compare."""
    n = cfg.micro_batch_size
    rows = rows[: cfg.eval_batches * n]
    return [collate(rows[i : i + n]) for i in range(0, len(rows), n)]


@torch.no_grad()
def evaluate(model: LLaMA, batches: list[Batch], device: torch.device) -> float:
    model.eval()
    losses = [loss_on(model, batch, device).item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def load_data(cfg: TrainConfig, model_max: int) -> tuple[list[Row], list[Row]]:
    data_dir = Path(cfg.data_dir)
    train_rows = torch.load(data_dir / "train.pt", weights_only=True)
    test_rows = torch.load(data_dir / "test.pt", weights_only=True)
    max_seq_length = cfg.max_seq_length
    if max_seq_length is None:
        manifest = json.loads((data_dir / "prepare.json").read_text())
        max_seq_length = manifest["max_seq_length"]
    longest = max(len(row["input_ids"]) for row in train_rows + test_rows)
    # Cutting here would cut off EOS; the data must be prepared for the length wanted.
    if longest > min(max_seq_length, model_max):
        raise DataError(
            f"samples of {longest} tokens exceed max_seq_length {max_seq_length} or the model's "
            f"{model_max}; prepare the data again with a lower --max-seq-length"
        )
    return train_rows, test_rows


def prepare_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> LLaMA:
    model, _ = load_model(cfg.checkpoint_dir)
    model = model.to(device=device, dtype=dtype)
    model.init_rope()  # rebuilt in float32: the cast above would have rounded the tables
    apply_lora(model, cfg.lora)
    return model.train()


def train_step(
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[float, int]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, tokens seen)."""
    total_loss, tokens = 0.0, 0
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        loss = loss_on(model, batch, device)
        (loss / cfg.grad_accum).backward()
        total_loss += loss.item() / cfg.grad_accum
        tokens += batch.tokens
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, tokens


def write_line(stream: IO[str], record: dict[str, Any]) -> None:
    stream.write(json.dumps(record) + "\n")
    stream.flush()


def train(cfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the whole fine-tuning job described by `cfg`; return its summary."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model = prepare_model(cfg, device, dtype)
    train_rows, test_rows = load_data(cfg, model.config.max_seq_len)
    eval_batches = held_out_batches(test_rows, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = iterate_batches(train_rows, cfg.micro_batch_size, generator)
    log(
        f"training {count_trainable(model):,} LoRA parameters on {len(train_rows)} samples, "
        f"{device} {str(dtype).removeprefix('torch.')}"
    )

    losses: list[float] = []
    val_loss, total_tokens, start = None, 0, time.perf_counter()
    with open(out / "metrics.jsonl", "w") as metrics:
        for step in range(1, cfg.max_steps + 1):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_start = time.perf_counter()
            loss, tokens = train_step(model, optimizer, batches, cfg, device)
            now = time.perf_counter()
            losses.append(loss)
            total_tokens += tokens
            write_line(
                metrics,
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "tokens": tokens,
                    "tokens_per_s": tokens / (now - step_start),
                    "elapsed_s": now - start,
                },
            )
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                log(
                    f"step {step}/{cfg.max_steps} loss {loss:.4f} lr {lr:.2e} "
                    f"{tokens / (now - step_start):.0f} tok/s"
                )
            if eval_batches and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
                val_loss = evaluate(model, eval_batches, device)
                write_line(metrics, {"step": step, "val_loss": val_loss})
                log(f"step {step} val_loss {val_loss:.4f}")
    seconds = time.perf_counter() - start

    save_adapters(model, cfg.lora, out)
    return {
        "out": str(out),
        "steps": cfg.max_steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "val_loss": val_loss,
        "seconds": round(seconds, 3),
        "tokens": total_tokens,
        "trainable_params": count_trainable(model),
        "device": str(device),
        "precision": str(dtype).removeprefix("torch."),
    }


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field; the defaults live in the dataclass alone."""
    parser = argparse.ArgumentParser(prog="python -m trainer.finetune", description=__doc__.splitlines()[0])
    defaults = {f.name: f.default for f in fields(TrainConfig)}

    def add(flag: str, dest: str, kind: Callable[[str], Any], text: str) -> None:
        default = defaults[dest]
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=dest, type=kind, help=f"{text} (default {shown})")

    parser.add_argument("--checkpoint-dir", required=True, help="base model checkpoint folder")
    parser.add_argument("--data-dir", required=True, help="folder with train.pt and test.pt")
    parser.add_argument("--out", dest="out_dir", required=True, help="output folder")
    add("--lora-r", "lora_r", int, "LoRA rank")
    add("--lora-alpha", "lora_alpha", float, "LoRA alpha; the update is scaled by alpha / r")
    add("--lora-dropout", "lora_dropout", float, "dropout on the adapter input")
    add("--lora-targets", "lora_targets", _targets, f"comma-separated, from {','.join(TARGETS)}")
    add("--lr", "lr", float, "peak learning rate")
    add("--weight-decay", "weight_decay", float, "AdamW weight decay")
    add("--micro-batch-size", "micro_batch_size", int, "samples per forward pass")
    add("--grad-accum", "grad_accum", int, "micro-batches per optimizer step")
    add("--max-steps", "max_steps", int, "optimizer steps")
    add("--warmup-steps", "warmup_steps", int, "linear warm-up steps")
    add("--eval-interval", "eval_interval", int, "optimizer steps between evaluations")
    add("--eval-batches", "eval_batches", int, "held-out micro-batches per evaluation")
    add("--log-interval", "log_interval", int, "optimizer steps between progress lines")
    add("--max-seq-length", "max_seq_length", int, "longest sample allowed; None: prepare's")
    add("--seed", "seed", int, "seed for initialisation, dropout and batch order")
    add("--grad-clip", "grad_clip", float, "gradient norm clip; 0 turns it off")
    add("--precision", "precision", str, "auto, fp32 or bf16")
    add("--device", "device", str, "auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "json" and v is not None}
    try:
        cfg = TrainConfig(**given)
    except ValueError as err:
        parser.error(str(err))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        summary = train(cfg, log)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        log(
            f"done: {summary['steps']} steps in {summary['seconds']} s, loss "
            f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, adapters in "
            f"{summary['out']}/lora.safetensors"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
