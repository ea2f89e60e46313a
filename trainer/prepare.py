"""Tokenize instruction records into train.pt and test.pt, with a manifest of what was kept.

The manifest (prepare.json) records every count a reader needs to trust the data: bad records,
truncated and dropped samples, the template, and the token-length histogram from which
`--max-seq-length` should be chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.data import (
    TEMPLATES,
    DataError,
    Sample,
    build_sample,
    load_records,
    tokenize,
    validate_records,
)
from trainer.report import report
from trainer.tokenizer import Tokenizer


@dataclass(frozen=True)
class PrepareConfig:
    input: Path
    tokenizer: Path
    out: Path
    max_seq_length: int
    test_size: int
    seed: int = 42
    template: str = "alpaca"
    mask_inputs: bool = True
    on_bad_record: str = "fail"


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Write train.pt, test.pt and prepare.json into `cfg.out`; return the manifest."""
    records, bad = validate_records(load_records(cfg.input))
    if bad and cfg.on_bad_record == "fail":
        listed = "; ".join(f"#{b.index}: {b.reason}" for b in bad[:10])
        raise DataError(f"{len(bad)} bad records ({listed}); use --on-bad-record skip to drop them")

    if not records:
        raise DataError(f"no usable records in {cfg.input}")
    tokenizer = Tokenizer(cfg.tokenizer)
    samples: list[Sample] = []
    lengths: list[int] = []
    for record in records:
        tokens = tokenize(tokenizer, record, cfg.template)
        lengths.append(tokens.full_length)
        sample = build_sample(tokens, cfg.max_seq_length, cfg.mask_inputs)
        if sample is not None:
            samples.append(sample)
    if cfg.test_size >= len(samples):
        raise DataError(f"--test-size {cfg.test_size} leaves no training samples of {len(samples)}")

    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(samples), generator=generator).tolist()
    split = {"test": order[: cfg.test_size], "train": order[cfg.test_size :]}
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, indices in split.items():
        rows = [{"input_ids": samples[i].input_ids, "labels": samples[i].labels} for i in indices]
        torch.save(rows, cfg.out / f"{name}.pt")

    manifest = {
        "input": str(cfg.input),
        "tokenizer": str(cfg.tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "template": cfg.template,
        "mask_inputs": cfg.mask_inputs,
        "max_seq_length": cfg.max_seq_length,
        "seed": cfg.seed,
        "records": len(records) + len(bad),
        "bad": len(bad),
        "bad_records": [{"index": b.index, "reason": b.reason} for b in bad],
        "truncated": sum(s.truncated for s in samples),
        "dropped": len(records) - len(samples),
        "train": len(split["train"]),
        "test": len(split["test"]),
        "length_max": max(lengths),
        "length_histogram": histogram(lengths),
    }
    (cfg.out / "prepare.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def histogram(lengths: list[int]) -> dict[str, int]:
    """Counts of full sample lengths (before truncation) in power-of-two buckets."""
    buckets: dict[str, int] = {}
    low, high = 0, 16
    while low < max(lengths):
        buckets[f"{low + 1}-{high}"] = sum(1 for n in lengths if low < n <= high)
        low, high = high, high * 2
    return buckets


def print_histogram(buckets: dict[str, int], max_seq_length: int) -> None:
    width = max(buckets.values()) or 1
    print(f"token lengths (max_seq_length {max_seq_length}):", file=sys.stderr)
    for label, count in buckets.items():
        print(f"  {label:>9} {count:6d} {'#' * round(40 * count / width)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="JSON array or JSON lines")
    parser.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece .model file")
    parser.add_argument("--out", required=True, type=Path, help="folder for train.pt and test.pt")
    parser.add_argument("--max-seq-length", required=True, type=int, help="tokens per sample")
    parser.add_argument("--test-size", required=True, type=int, help="samples held out for eval")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    parser.add_argument("--template", choices=tuple(TEMPLATES), default="alpaca")
    parser.add_argument(
        "--no-mask-inputs",
        dest="mask_inputs",
        action="store_false",
        help="also take the loss on prompt tokens",
    )
    parser.add_argument("--on-bad-record", choices=("skip", "fail"), default="fail")
    parser.add_argument("--json", action="store_true", help="print the manifest on stdout")
    args = parser.parse_args(argv)
    if args.max_seq_length < 2 or args.test_size < 0:
        parser.error("--max-seq-length must be at least 2 and --test-size at least 0")

    cfg = PrepareConfig(**{k: v for k, v in vars(args).items() if k != "json"})
    start = time.perf_counter()
    try:
        manifest = prepare(cfg)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_histogram(manifest["length_histogram"], cfg.max_seq_length)
    return report(
        manifest,
        args.json,
        (
            f"{manifest['records']} records: {manifest['bad']} bad, {manifest['truncated']} "
            f"truncated, {manifest['dropped']} dropped; {manifest['train']} train, "
            f"{manifest['test']} test in {time.perf_counter() - start:.1f} s -> {cfg.out}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
