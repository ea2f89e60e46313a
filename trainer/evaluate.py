"""Loss and perplexity of a checkpoint on held-out data, without and with LoRA adapters.

One command compares the base model with the fine-tuned one on DATA/test.pt, written by
`trainer.prepare`. The loss is a mean over every target token that counts (prompt tokens are
masked when the data was prepared so), weighted by tokens rather than by batch, so the result
does not depend on the micro-batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.batching import Batch, Row, collate, loss_on
from trainer.checkpoint import load_model
from trainer.data import IGNORE_INDEX, DataError
from trainer.devices import device_arg
from trainer.lora import load_adapters
from trainer.model import LLaMA


def load_test_rows(data_dir: Path, max_seq_len: int) -> list[Row]:
    path = data_dir / "test.pt"
    if not path.is_file():
        raise DataError(f"{path} not found: write it with python -m trainer.prepare")
    rows = torch.load(path, weights_only=True)
    if not rows:
        raise DataError(f"{path} holds no samples")
    longest = max(len(row["input_ids"]) for row in rows)
    if longest > max_seq_len:
        raise DataError(f"{path} has samples of {longest} tokens, more than the model's {max_seq_len}")
    return rows


def batches(rows: list[Row], micro_batch_size: int, max_batches: int | None = None) -> list[Batch]:
    """The rows in their stored order, `micro_batch_size` at a time, the first `max_batches`."""
    starts = range(0, len(rows), micro_batch_size)[:max_batches]
    return [collate(rows[i : i + micro_batch_size]) for i in starts]


@torch.no_grad()
def evaluate(model: LLaMA, held_out: list[Batch], device: torch.device) -> dict[str, Any]:
    """Token-weighted mean loss over all targets of `held_out`, and its perplexity."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in held_out:
        n = int((batch.targets != IGNORE_INDEX).sum())
        if n:  # a batch whose targets are all masked has no loss (cross_entropy gives NaN)
            total += loss_on(model, batch, device).item() * n
            tokens += n
    if not tokens:
        raise DataError("the evaluated samples have no target tokens")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def compare(
    checkpoint: Path,
    data_dir: Path,
    lora: Path | None,
    micro_batch_size: int,
    max_batches: int | None,
    device: torch.device,
) -> dict[str, Any]:
    """The base model's scores, then, on the same batches, the scores with the adapters."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} not found")
    model, config = load_model(checkpoint)
    held_out = batches(load_test_rows(data_dir, config.max_seq_len), micro_batch_size, max_batches)
    model = model.to(device)
    base = evaluate(model, held_out, device)
    if lora is None:
        return {"base": base, "lora": None}
    load_adapters(model, lora)  # the adapters are created on the model's device
    return {"base": base, "lora": evaluate(model, held_out, device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="base checkpoint folder")
    parser.add_argument("--data-dir", required=True, type=Path, help="folder with test.pt")
    parser.add_argument("--lora", type=Path, help="lora.safetensors (or its folder) to compare with")
    parser.add_argument(
        "--micro-batch-size", type=int, default=8, help="samples per forward pass (default 8)"
    )
    parser.add_argument("--max-batches", type=int, help="evaluate only the first N micro-batches")
    parser.add_argument(
        "--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    if args.micro_batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        parser.error("--micro-batch-size and --max-batches must be at least 1")

    try:
        result = compare(
            args.checkpoint, args.data_dir, args.lora, args.micro_batch_size, args.max_batches, args.device
        )
    except (FileNotFoundError, ValueError) as err:  # DataError and AdapterError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        for name, scores in result.items():
            if scores is not None:
                print(
                    f"{name}: loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f} "
                    f"over {scores['tokens']} tokens",
                    file=sys.stderr,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
