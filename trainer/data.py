"""Instruction records to training samples: validation, prompt templates, masking, truncation.

Records follow the Alpaca/instinwild layout: `instruction`, optional `input`, `output`.
A sample that fits ends in EOS, so the model learns where an answer stops. A response cut by
the length limit never ends in EOS by default (`TRUNCATION`): that would teach the model to stop
wherever the limit happened to fall, the cut-off answers of the seed's fine-tune.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainer.tokenizer import Tokenizer

IGNORE_INDEX = -100

# What becomes of a sample whose prompt + response + EOS is longer than max_seq_length:
#   no-eos  the response is cut and left open: its tokens are learnt, no stop is (the default)
#   drop    the sample is left out
#   eos     the response is cut and EOS appended, which teaches a stop at the cut
TRUNCATION = ("no-eos", "drop", "eos")

TEMPLATES: dict[str, tuple[str, str]] = {
    # (with input, without input)
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
    ),
    "alpaca_zh": (
        "以下是描述任务的指令，以及提供更多上下文的输入。请写出恰当完成该请求的回答。\n\n"
        "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:",
        "以下是描述任务的指令。请写出恰当完成该请求的回答。\n\n### 指令:\n{instruction}\n\n### 回答:",
    ),
}


class DataError(ValueError):
    """Input data that cannot be used as asked."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class BadRecord:
    index: int
    reason: str


@dataclass(frozen=True)
class Tokenized:
    prompt: list[int]  # starts with BOS
    response: list[int]
    eos_id: int

    @property
    def full_length(self) -> int:
        """Tokens that prompt + response + EOS take before any truncation."""
        return len(self.prompt) + len(self.response) + 1


@dataclass(frozen=True)
class Sample:
    input_ids: torch.Tensor  # (T,) prompt + response, + EOS unless cut open
    labels: torch.Tensor  # (T,) IGNORE_INDEX where the loss is not taken
    prompt_length: int  # tokens before the response, BOS included
    truncated: bool

    def row(self) -> dict[str, Any]:
        """The sample as train.pt and test.pt store it."""
        return {"input_ids": self.input_ids, "labels": self.labels, "prompt_length": self.prompt_length}


def load_records(path: str | Path) -> list[Any]:
    """A JSON array, or JSON lines (one object per line, each at most MAX_LINE_BYTES)."""
    try:
        with open(path, "rb") as f:
            if f.read(4096).lstrip().startswith(b"["):
                f.seek(0)
                return json.loads(_text(f.read(), path))
            f.seek(0)
            return [json.loads(_text(line, path, number)) for number, line in _lines(f, path) if line.strip()]
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is neither a JSON array nor JSON lines: {err}") from err


MAX_LINE_BYTES = 64 << 20  # one instruction record; a longer line is not one


def _lines(f, path: str | Path):
    """(line number, bytes) of each line, refusing one longer than MAX_LINE_BYTES unread."""
    for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise DataError(
                f"{path}: line {number} is over {MAX_LINE_BYTES >> 20} MB: not a JSON lines record"
            )
        yield number, line


def _text(data: bytes, path: str | Path, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"line {line}" if line is not None else f"byte {err.start}"
        raise DataError(f"{path} is not UTF-8 text ({where})") from None


def validate_records(raw: list[Any]) -> tuple[list[Record], list[BadRecord]]:
    """Split raw records into usable ones and the rest, each with its index and the reason."""
    good, bad = [], []
    for index, item in enumerate(raw):
        reason = _problem(item)
        if reason:
            bad.append(BadRecord(index, reason))
        else:
            good.append(Record(item["instruction"], item.get("input", ""), item["output"]))
    return good, bad


def _problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"not an object but {type(item).__name__}"
    for key in ("instruction", "output"):
        if key not in item:
            return f"missing field {key!r}"
    for key in ("instruction", "input", "output"):
        if key in item and not isinstance(item[key], str):
            return f"field {key!r} is {type(item[key]).__name__}, not a string"
    if not item["instruction"].strip():
        return "empty instruction"
    if not item["output"].strip():
        return "empty output"
    return None


def format_prompt(record: Record, template: str = "alpaca") -> str:
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    with_input, without_input = TEMPLATES[template]
    if record.input.strip():
        return with_input.format(instruction=record.instruction, input=record.input)
    return without_input.format(instruction=record.instruction)


def tokenize(tokenizer: Tokenizer, record: Record, template: str = "alpaca") -> Tokenized:
    return Tokenized(
        prompt=tokenizer.encode(format_prompt(record, template), bos=True, eos=False),
        response=tokenizer.encode(record.output, bos=False, eos=False),
        eos_id=tokenizer.eos_id,
    )


def build_sample(
    tokens: Tokenized, max_seq_length: int, mask_inputs: bool = True, on_truncate: str = "no-eos"
) -> Sample | None:
    """Prompt + response + EOS, at most `max_seq_length` long; a longer one as `on_truncate`
    says (see TRUNCATION). None when the sample is dropped, or when the prompt leaves no room
    for a response token (and EOS, where EOS is kept)."""
    if on_truncate not in TRUNCATION:
        raise DataError(f"unknown truncation policy {on_truncate!r}; choose from {', '.join(TRUNCATION)}")
    truncated = tokens.full_length > max_seq_length
    if truncated and on_truncate == "drop":
        return None
    end = [] if truncated and on_truncate == "no-eos" else [tokens.eos_id]
    room = max_seq_length - len(tokens.prompt) - len(end)
    if room < 1:
        return None
    input_ids = torch.tensor(tokens.prompt + tokens.response[:room] + end)
    labels = input_ids.clone()
    if mask_inputs:
        labels[: len(tokens.prompt)] = IGNORE_INDEX
    return Sample(input_ids, labels, len(tokens.prompt), truncated)


def encode_sample(
    tokenizer: Tokenizer,
    record: Record,
    max_seq_length: int,
    template: str = "alpaca",
    mask_inputs: bool = True,
    on_truncate: str = "no-eos",
) -> Sample | None:
    return build_sample(tokenize(tokenizer, record, template), max_seq_length, mask_inputs, on_truncate)
