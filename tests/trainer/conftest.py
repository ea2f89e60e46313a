"""Shared fixtures: generated instruction records, a SentencePiece model trained on them, and
the tiny model shape most trainer tests use."""

import json
from pathlib import Path

import pytest

from trainer.data import validate_records
from trainer.model import Config
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


def tiny_config(vocab_size: int, **overrides) -> Config:
    """2 layers, 32 wide, 4 heads sharing 2 key/value heads: small, yet every path (GQA included)."""
    shape = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64)
    return Config(vocab_size=vocab_size, **{**shape, **overrides})
