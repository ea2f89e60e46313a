"""Tokenizer training and LLaMA's special ids; synthetic records it is trained on."""

import json

import pytest

from trainer.data import validate_records
from trainer.synthetic import generate
from trainer.tokenizer import main, train

pytestmark = pytest.mark.unit


def test_special_ids_follow_llama(tokenizer):
    assert (tokenizer.processor.unk_id(), tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.pad_id == -1
    assert tokenizer.vocab_size == 600


def test_chinese_round_trip_including_unseen_characters(tokenizer):
    text = "浙江省的省会是杭州。\n把下面的词语重复三遍：龘靐 (bytes), 3 加 5 等于 8。"
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.processor.unk_id() not in ids  # byte fallback instead of <unk>
    assert tokenizer.decode(ids) == text


def test_template_wording_costs_few_tokens(tokenizer):
    header = "Below is an instruction that describes a task."
    assert len(tokenizer.encode(header, bos=False)) < 12


def test_training_is_deterministic(records_file):
    records, _ = validate_records(json.loads(records_file.read_text(encoding="utf-8")))
    assert train(records, 500) == train(records, 500)


def test_too_small_a_vocabulary_is_a_usage_error(records_file, tmp_path, capsys):
    args = ["train", "--input", str(records_file), "--vocab-size", "300", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "Vocabulary size is smaller" in capsys.readouterr().err


def test_cli_writes_a_model_and_a_json_summary(records_file, tmp_path, capsys):
    out = tmp_path / "t.model"
    args = ["train", "--input", str(records_file), "--vocab-size", "500", "--out", str(out)]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == 500 and out.exists()


def test_synthetic_records_are_deterministic_and_well_formed():
    records = generate(60, seed=3)
    assert records == generate(60, seed=3) != generate(60, seed=4)
    good, bad = validate_records(records)
    assert len(good) == 60 and not bad
    assert {"instruction", "input", "output", "id"} == set(records[0])
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
