"""Samples: prompt masking, the truncation policies, dropping, validation, prepare's outputs."""

import json
from dataclasses import replace

import pytest
import torch

from trainer.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    Tokenized,
    build_sample,
    encode_sample,
    format_prompt,
    load_records,
    validate_records,
)
from trainer.prepare import PrepareConfig, prepare
from trainer.prepare import main as prepare_main

pytestmark = pytest.mark.unit

EOS = 2
TOKENS = Tokenized(prompt=[1, 10, 11, 12], response=[20, 21, 22, 23, 24], eos_id=EOS)


def test_prompt_is_masked_and_eos_ends_the_sample():
    sample = build_sample(TOKENS, max_seq_length=64)
    assert sample.input_ids.tolist() == [1, 10, 11, 12, 20, 21, 22, 23, 24, EOS]
    assert sample.labels.tolist() == [IGNORE_INDEX] * 4 + [20, 21, 22, 23, 24, EOS]
    assert not sample.truncated


def test_unmasked_labels_equal_inputs():
    sample = build_sample(TOKENS, max_seq_length=64, mask_inputs=False)
    assert torch.equal(sample.labels, sample.input_ids)


def test_by_default_a_cut_response_is_left_open_and_never_taught_to_stop():
    sample = build_sample(TOKENS, max_seq_length=7)
    assert sample.input_ids.tolist() == [1, 10, 11, 12, 20, 21, 22]
    assert EOS not in sample.labels.tolist() and sample.truncated
    assert sample.prompt_length == 4


def test_drop_leaves_a_cut_sample_out_and_eos_keeps_the_old_stop_at_the_cut():
    assert build_sample(TOKENS, max_seq_length=7, on_truncate="drop") is None
    assert build_sample(TOKENS, max_seq_length=10, on_truncate="drop").labels[-1] == EOS  # fits whole
    sample = build_sample(TOKENS, max_seq_length=7, on_truncate="eos")
    assert sample.input_ids.tolist() == [1, 10, 11, 12, 20, 21, EOS] and sample.truncated
    with pytest.raises(DataError, match="unknown truncation policy 'cut'"):
        build_sample(TOKENS, max_seq_length=7, on_truncate="cut")


def test_prompt_without_room_for_an_answer_is_dropped():
    assert build_sample(TOKENS, max_seq_length=4) is None  # the prompt alone
    assert build_sample(TOKENS, max_seq_length=5).input_ids.tolist() == [1, 10, 11, 12, 20]
    assert build_sample(TOKENS, max_seq_length=5, on_truncate="eos") is None  # prompt + EOS only
    kept = build_sample(TOKENS, max_seq_length=6, on_truncate="eos")
    assert kept.input_ids.tolist() == [1, 10, 11, 12, 20, EOS]


def test_bad_records_are_reported_by_index():
    raw = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "a", "input": ""},
        {"instruction": "a", "input": 3, "output": "b"},
        {"instruction": "a", "output": "  "},
        "text",
        {"instruction": "a", "output": "b"},  # input is optional
    ]
    good, bad = validate_records(raw)
    assert len(good) == 2
    assert [(b.index, b.reason) for b in bad] == [
        (1, "missing field 'output'"),
        (2, "field 'input' is int, not a string"),
        (3, "empty output"),
        (4, "not an object but str"),
    ]


def test_alpaca_prompt_is_exact():
    with_input = format_prompt(Record("Add.", "1 2", "3"))
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:"
    )
    assert format_prompt(Record("Add.", "", "3")).endswith("### Instruction:\nAdd.\n\n### Response:")
    assert "### 指令:\n加。" in format_prompt(Record("加。", "", "3"), "alpaca_zh")
    with pytest.raises(DataError):
        format_prompt(Record("a", "", "b"), "vicuna")


def test_encode_sample_with_a_real_tokenizer(tokenizer):
    record = Record("计算 3 加 5 等于多少。", "", "3 加 5 等于 8。")
    sample = encode_sample(tokenizer, record, max_seq_length=256)
    answer = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert sample.input_ids[0] == tokenizer.bos_id and answer[-1] == tokenizer.eos_id
    assert tokenizer.decode(answer[:-1]) == "3 加 5 等于 8。"


def test_json_lines_and_arrays_load_alike(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_records(tmp_path / "a.json") == load_records(tmp_path / "b.jsonl") == rows


def test_prepare_writes_split_and_manifest(records_file, tokenizer, tmp_path):
    raw = json.loads(records_file.read_text(encoding="utf-8"))
    raw[5] = {"instruction": "x", "output": ""}
    source = tmp_path / "records.json"
    source.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    cfg = PrepareConfig(
        source,
        tokenizer.path,
        tmp_path / "out",
        max_seq_length=60,
        test_size=20,
        seed=3,
        on_bad_record="skip",
    )
    manifest = prepare(cfg)

    train = torch.load(tmp_path / "out" / "train.pt", weights_only=True)
    test = torch.load(tmp_path / "out" / "test.pt", weights_only=True)
    assert manifest["bad_records"] == [{"index": 5, "reason": "empty output"}]
    assert manifest["train"] == len(train) and manifest["test"] == len(test) == 20
    assert manifest["records"] == 300 and manifest["truncated"] + manifest["dropped"] > 0
    assert len(train) + len(test) + manifest["dropped"] == 299
    assert sum(manifest["length_histogram"].values()) == 299
    assert all(len(row["input_ids"]) <= 60 for row in train + test)
    left_open = [row for row in train + test if row["labels"][-1] != tokenizer.eos_id]
    assert all(len(row["input_ids"]) == 60 for row in left_open)  # only a cut sample has no EOS
    assert 0 < len(left_open) <= manifest["truncated"]
    assert all(row["prompt_length"] == int((row["labels"] == IGNORE_INDEX).sum()) for row in train)
    assert json.loads((tmp_path / "out" / "prepare.json").read_text()) == manifest

    again = prepare(replace(cfg, out=tmp_path / "again"))
    again_test = torch.load(tmp_path / "again" / "test.pt", weights_only=True)
    assert again["test"] == 20
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(test, again_test, strict=True))

    with pytest.raises(DataError, match="#5: empty output"):
        prepare(PrepareConfig(source, tokenizer.path, tmp_path / "x", 60, 20))


def test_prepare_warns_above_2_percent_cut_and_names_the_length_that_keeps_98(
    records_file, tokenizer, tmp_path, capsys
):
    argv = ["--input", str(records_file), "--tokenizer", str(tokenizer.path), "--test-size", "10"]
    assert prepare_main([*argv, "--out", str(tmp_path / "short"), "--max-seq-length", "40"]) == 0
    err = capsys.readouterr().err
    manifest = json.loads((tmp_path / "short" / "prepare.json").read_text())
    assert manifest["truncated_share"] > 0.02 and manifest["on_truncate"] == "no-eos"
    assert f"{manifest['truncated_share']:.1%} truncated" in err.splitlines()[0]
    keeps = manifest["length_keeping_98_percent"]
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"--max-seq-length {keeps} keeps 98% whole" in warning[0]

    assert prepare_main([*argv, "--out", str(tmp_path / "long"), "--max-seq-length", str(keeps)]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "long" / "prepare.json").read_text())["truncated_share"] <= 0.02


def test_drop_policy_leaves_out_every_cut_sample(records_file, tokenizer, tmp_path):
    cfg = PrepareConfig(records_file, tokenizer.path, tmp_path / "out", 40, 10, on_truncate="drop")
    manifest = prepare(cfg)
    rows = torch.load(tmp_path / "out" / "train.pt", weights_only=True)
    assert manifest["dropped"] >= manifest["truncated"] > 0
    assert all(row["labels"][-1] == tokenizer.eos_id for row in rows)
