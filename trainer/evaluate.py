"""Loss, perplexity and answer endings of a checkpoint on held-out data, without and with LoRA.

One command compares the base model with the fine-tuned one on DATA/test.pt, written by
`trainer.prepare`. The loss is a mean over every target token that counts (prompt tokens are
masked when the data was prepared so), weighted by tokens rather than by batch, so the result
does not depend on the micro-batch size. With --answers N (default 32), each model also answers
the first N held-out prompts greedily, with room up to the data's max_seq_length: the share of
answers that end in EOS, and their mean length against the references', tell whether the model
learnt where an answer stops (cut-off answers) and how long it talks.
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
from trainer.checkpoint import TOKENIZER, load_model
from trainer.data import IGNORE_INDEX, DataError
from trainer.devices import device_arg
from trainer.generate import generate
from trainer.lora import load_adapters
from trainer.model import LLaMA
from trainer.tokenizer import Tokenizer

DEFAULT_ANSWERS = 32


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


def prompt_length(row: Row) -> int:
    """Tokens of a held-out sample before its response: recorded by prepare, or, in data
    prepared before it recorded them, the masked prefix of the labels."""
    if "prompt_length" in row:
        return int(row["prompt_length"])
    unmasked = (row["labels"] != IGNORE_INDEX).nonzero()
    if not len(unmasked) or int(unmasked[0]) == 0:
        raise DataError("test.pt records no prompt lengths and masks no prompts: prepare the data again")
    return int(unmasked[0])


@torch.no_grad()
def answer_endings(model: LLaMA, rows: list[Row], eos_id: int, max_seq_length: int) -> dict[str, Any]:
    """Greedy answers to the prompts of `rows`, each with room up to `max_seq_length` tokens in
    all, as in training: how many end in EOS, and how long they are against the references."""
    model.eval()
    ended, lengths, references = 0, [], []
    for row in rows:
        ids = row["input_ids"].tolist()
        n = prompt_length(row)
        new = generate(
            model,
            ids[:n],
            max_new_tokens=max(1, max_seq_length - n),
            temperature=0.0,
            top_k=None,
            top_p=1.0,
            eos_id=eos_id,
            generator=None,
        )
        ended += bool(new) and new[-1] == eos_id
        lengths.append(len(new))
        references.append(len(ids) - n)
    return {
        "answers": len(rows),
        "eos_share": ended / len(rows),
        "answer_tokens_mean": sum(lengths) / len(rows),
        "reference_tokens_mean": sum(references) / len(rows),
    }


def compare(
    checkpoint: Path,
    data_dir: Path,
    lora: Path | None,
    micro_batch_size: int,
    max_batches: int | None,
    device: torch.device,
    answers: int = DEFAULT_ANSWERS,
) -> dict[str, Any]:
    """The base model's scores, then, on the same batches and prompts, those with the adapters."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} not found")
    model, config = load_model(checkpoint)
    rows = load_test_rows(data_dir, config.max_seq_len)
    held_out = batches(rows, micro_batch_size, max_batches)
    max_seq_length = _prepared_length(data_dir, rows)
    eos_id = _eos_id(checkpoint)
    model = model.to(device)

    def scores() -> dict[str, Any]:
        found = evaluate(model, held_out, device)
        if answers:
            found |= answer_endings(model, rows[:answers], eos_id, min(max_seq_length, config.max_seq_len))
        return found

    base = scores()
    if lora is None:
        return {"base": base, "lora": None}
    load_adapters(model, lora)  # the adapters are created on the model's device
    return {"base": base, "lora": scores()}


def _prepared_length(data_dir: Path, rows: list[Row]) -> int:
    """The max_seq_length the data was prepared with (the longest sample, if prepare.json is gone)."""
    manifest = data_dir / "prepare.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["max_seq_length"])
    return max(len(row["input_ids"]) for row in rows)


def _eos_id(checkpoint: Path) -> int:
    return Tokenizer(checkpoint / TOKENIZER).eos_id


def summary_line(scores: dict[str, Any]) -> str:
    line = f"loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f} over {scores['tokens']} tokens"
    if "answers" not in scores:
        return line
    return (
        f"{line}; {scores['eos_share']:.0%} of {scores['answers']} greedy answers end in EOS, "
        f"{scores['answer_tokens_mean']:.1f} tokens on average (references "
        f"{scores['reference_tokens_mean']:.1f})"
    )


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
        "--answers",
        type=int,
        default=DEFAULT_ANSWERS,
        help=f"held-out prompts each model answers greedily; 0: none (default {DEFAULT_ANSWERS})",
    )
    parser.add_argument(
        "--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    if args.micro_batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        parser.error("--micro-batch-size and --max-batches must be at least 1")
    if args.answers < 0:
        parser.error("--answers must not be negative")

    try:
        result = compare(
            args.checkpoint,
            args.data_dir,
            args.lora,
            args.micro_batch_size,
            args.max_batches,
            args.device,
            args.answers,
        )
    except (FileNotFoundError, ValueError) as err:  # DataError and AdapterError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        for name, scores in result.items():
            if scores is not None:
                print(f"{name}: {summary_line(scores)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
