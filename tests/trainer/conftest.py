"""Shared fixtures: generated instruction records and a SentencePiece model trained on them."""

import json
from pathlib import Path

import pytest

from trainer.data import validate_records
from trainer.synthetic import generate
from trainer.tokenizer import Tokenizer, train


@pytest.fixture(scope="session")
def records_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "instructions.json"
    path.write_text(json.dumps(generate(300, seed=1), ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(records_file, tmp_path_factory) -> Tokenizer:
    records, _ = validate_records(json.loads(records_file.read_text(encoding="utf-8")))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(train(records, vocab_size=600))
    return Tokenizer(path)
