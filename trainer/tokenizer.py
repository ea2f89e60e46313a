"""SentencePiece tokenizer with LLaMA's conventions, and a command that trains one on records.

Trained models use LLaMA's special ids (unk 0, bos 1, eos 2, no pad) and byte fallback, so any
text encodes and decodes losslessly whatever the vocabulary size.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from trainer.data import (
    TEMPLATES,
    DataError,
    Record,
    format_prompt,
    load_records,
    validate_records,
)
from trainer.report import report


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.processor = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (LLaMA's case); batches are padded by the trainer."""
        return self.processor.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def training_lines(records: list[Record], template: str | None) -> Iterator[str]:
    """The text the model will see, one line at a time; with a template its fixed wording
    becomes a few tokens instead of many."""
    for record in records:
        if template:
            text = format_prompt(record, template) + "\n" + record.output
        else:
            text = "\n".join((record.instruction, record.input, record.output))
        yield from (line for line in text.splitlines() if line.strip())


def train(
    records: list[Record], vocab_size: int, model_type: str = "bpe", template: str | None = "alpaca"
) -> bytes:
    """A serialized SentencePiece model trained in-process, deterministically (one thread,
    input in file order, fixed seed)."""
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(records, template),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tokenizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("train", help="train a SentencePiece model on instruction records")
    cmd.add_argument("--input", required=True, type=Path, help="records: JSON array or JSON lines")
    cmd.add_argument("--vocab-size", required=True, type=int, help="pieces in the vocabulary")
    cmd.add_argument("--out", required=True, type=Path, help="where to write the .model file")
    cmd.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="default bpe")
    cmd.add_argument(
        "--template",
        choices=(*TEMPLATES, "none"),
        default="alpaca",
        help="train on records formatted with this prompt template (default alpaca)",
    )
    cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    template = None if args.template == "none" else args.template
    try:
        records, bad = validate_records(load_records(args.input))
        if not records:
            raise DataError(f"no usable records in {args.input}")
        model = train(records, args.vocab_size, args.model_type, template)
    except (DataError, RuntimeError) as err:  # SentencePiece reports a bad vocab size as a RuntimeError
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)

    summary = {
        "out": str(args.out),
        "vocab_size": Tokenizer(args.out).vocab_size,
        "model_type": args.model_type,
        "template": args.template,
        "records": len(records),
        "bad_records": len(bad),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return report(
        summary,
        args.json,
        (
            f"trained a {summary['vocab_size']}-piece {args.model_type} tokenizer on "
            f"{len(records)} records in {summary['seconds']} s: {args.out}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
