"""Tokenize instruction records into train.pt and test.pt, with a manifest of what was kept.

The manifest (prepare.json) records every count a reader needs to trust the data: bad records,
truncated and dropped samples, the template, the truncation policy, and the token-length
histogram from which `--max-seq-length` should be chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.data import (
    TEMPLATES,
    TRUNCATION,
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
    on_truncate: str = "no-eos"


# Above this share of samples cut by --max-seq-length, prepare warns and names a length that keeps
# KEEP_WHOLE of them whole.
TRUNCATED_WARNING = 0.02
KEEP_WHOLE = 0.98


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
        sample = build_sample(tokens, cfg.max_seq_length, cfg.mask_inputs, cfg.on_truncate)
        if sample is not None:
            samples.append(sample)
    if cfg.test_size >= len(samples):
        raise DataError(f"--test-size {cfg.test_size} leaves no training samples of {len(samples)}")

    # Counted over the records, not the samples kept: under --on-truncate drop the cut ones are gone.
    truncated = sum(n > cfg.max_seq_length for n in lengths)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(samples), generator=generator).tolist()
    split = {"test": order[: cfg.test_size], "train": order[cfg.test_size :]}
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, indices in split.items():
        torch.save([samples[i].row() for i in indices], cfg.out / f"{name}.pt")

    manifest = {
        "input": str(cfg.input),
        "tokenizer": str(cfg.tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "template": cfg.template,
        "mask_inputs": cfg.mask_inputs,
        "max_seq_length": cfg.max_seq_length,
        "on_truncate": cfg.on_truncate,
        "seed": cfg.seed,
        "records": len(records) + len(bad),
        "bad": len(bad),
        "bad_records": [{"index": b.index, "reason": b.reason} for b in bad],
        "truncated": truncated,
        "truncated_share": truncated / len(lengths),
        "length_keeping_98_percent": quantile(lengths, KEEP_WHOLE),
        "dropped": len(records) - len(samples),
        "train": len(split["train"]),
        "test": len(split["test"]),
        "length_max": max(lengths),
        "length_histogram": histogram(lengths),
    }
    (cfg.out / "prepare.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def quantile(lengths: list[int], share: float) -> int:
    """The smallest length that `share` of the samples fit in whole."""
    ordered = sorted(lengths)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def truncation_warning(manifest: dict[str, Any]) -> str | None:
    """One line when more samples are cut than a fine-tune should accept."""
    share = manifest["truncated_share"]
    if share <= TRUNCATED_WARNING:
        return None
    return (
        f"warning: {share:.1%} of samples are longer than --max-seq-length "
        f"{manifest['max_seq_length']} ({manifest['on_truncate']}: "
        f"{TRUNCATION_EFFECT[manifest['on_truncate']]}); --max-seq-length "
        f"{manifest['length_keeping_98_percent']} keeps {KEEP_WHOLE:.0%} whole"
    )


TRUNCATION_EFFECT = {
    "no-eos": "their answers are learnt without an end",
    "drop": "they are left out",
    "eos": "their answers are taught to stop at the cut",
}


def histogram(lengths: list[int]) -> dict[str, int]:
    """Counts of full sample lengths (before truncation) in power-of-two buckets."""
    buckets: dict[str, int] = {}
    low, high = 0, 16
    while low < max(lengths):
        buckets[f"{low + 1}-{high}"] = sum(1 for n in lengths if low < n <= high)
        low, high = high, high * 2
    return buckets


def print_histogram(manifest: dict[str, Any]) -> None:
    """The length histogram on stderr, the truncated share beside it, and the warning if due."""
    buckets, limit = manifest["length_histogram"], manifest["max_seq_length"]
    width = max(buckets.values()) or 1
    print(
        f"token lengths (max_seq_length {limit}: {manifest['truncated_share']:.1%} truncated, "
        f"{manifest['on_truncate']}):",
        file=sys.stderr,
    )
    for label, count in buckets.items():
        print(f"  {label:>9} {count:6d} {'#' * round(40 * count / width)}", file=sys.stderr)
    warning = truncation_warning(manifest)
    if warning:
        print(warning, file=sys.stderr)


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
    parser.add_argument(
        "--on-truncate",
        choices=TRUNCATION,
        default="no-eos",
        help="a sample longer than --max-seq-length: cut with no EOS (default), dropped, or cut with EOS",
    )
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
    print_histogram(manifest)
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
