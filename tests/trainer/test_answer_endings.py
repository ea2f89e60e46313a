"""Answers end where the model ends them: a model fine-tuned on samples that end in EOS stops its
held-out answers itself, the base it started from does not, and every answer says why it
stopped. The template the data was prepared with travels with the adapters.

The base is a tiny language model trained here, in seconds, on the same kind of text with no
instruction format and no EOS: like a real base model, it knows the language but not where an
answer to an instruction ends."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.checkpoint import TOKENIZER, save_model
from trainer.data import Record, format_prompt, validate_records
from trainer.evaluate import main as evaluate_main
from trainer.finetune import TrainConfig, train
from trainer.lora import read_provenance
from trainer.model import Config, LLaMA
from trainer.prepare import PrepareConfig, prepare
from trainer.samples import main as samples_main
from trainer.synthetic import generate
from trainer.tokenizer import Tokenizer
from trainer.tokenizer import train as train_tokenizer

pytestmark = pytest.mark.unit
TEMPLATE = "alpaca_zh"


def base_language_model(texts: list[list[int]], vocab_size: int) -> LLaMA:
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_kv_head=4, n_embd=128, intermediate_size=344, max_seq_len=128)
    model = LLaMA(Config(vocab_size=vocab_size, **shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = [texts[i] for i in torch.randint(0, len(texts), (16,), generator=generator).tolist()]
        T = max(map(len, batch)) - 1
        inputs = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.full((len(batch), T), -100)
        for row, ids in enumerate(map(torch.tensor, batch)):
            inputs[row, : len(ids) - 1], targets[row, : len(ids) - 1] = ids[:-1], ids[1:]
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A base checkpoint, prepared data (template alpaca_zh) and LoRA adapters fine-tuned on it."""
    root = tmp_path_factory.mktemp("endings")
    raw = generate(400, seed=7)
    (root / "records.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    records, _ = validate_records(raw)
    templated = [Record(format_prompt(r, TEMPLATE), "", r.output) for r in records]  # pieces for the template
    (root / "tok.model").write_bytes(train_tokenizer(templated, vocab_size=600))
    tokenizer = Tokenizer(root / "tok.model")
    texts = [tokenizer.encode(format_prompt(r, TEMPLATE) + " " + r.output, bos=True) for r in records[40:]]
    save_model(base_language_model(texts, tokenizer.vocab_size), root / "base")
    shutil.copyfile(root / "tok.model", root / "base" / TOKENIZER)
    prepare(PrepareConfig(root / "records.json", root / "tok.model", root / "data", 128, 40, 7, TEMPLATE))
    cfg = TrainConfig(
        str(root / "base"),
        str(root / "data"),
        str(root / "out"),
        lora_targets=("q", "v", "o", "mlp"),
        lora_dropout=0.0,
        lr=1e-2,
        micro_batch_size=8,
        max_steps=200,
        warmup_steps=5,
        eval_interval=50,
        seed=7,
        device="cpu",
        base_model="org/tiny-base",
    )
    train(cfg, lambda _: None)
    return root


def test_fine_tuned_answers_end_in_eos_and_the_bases_do_not(run, capsys):
    argv = ["--checkpoint", str(run / "base"), "--data-dir", str(run / "data"), "--lora", str(run / "out")]
    assert evaluate_main([*argv, "--answers", "40", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    base, tuned = result["base"], result["lora"]
    assert base["answers"] == tuned["answers"] == 40
    assert tuned["eos_share"] >= 0.95, tuned
    assert base["eos_share"] < 0.5
    # The references are the held-out answers (+ EOS); a tuned answer is about as long.
    assert abs(tuned["answer_tokens_mean"] - tuned["reference_tokens_mean"]) < 3
    assert base["answer_tokens_mean"] > 3 * base["reference_tokens_mean"]  # it talks on to the limit


def test_samples_record_why_each_answer_stopped_and_use_the_adapters_template(run, capsys):
    out = run / "samples.json"
    argv = [
        "--checkpoint",
        str(run / "base"),
        "--lora",
        str(run / "out"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert samples_main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["template"] == TEMPLATE and result["max_new_tokens"] is None
    for sample in result["samples"]:
        assert sample["before_stop_reason"] == "length" and sample["before_tokens"] > 50
        assert sample["after_stop_reason"] in ("eos", "length")
        assert sample["after_tokens"] >= 1
    assert sum(s["after_stop_reason"] == "eos" for s in result["samples"]) >= 3
    assert "warning" not in capsys.readouterr().err

    assert samples_main([*argv, "--template", "alpaca", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: the adapters were trained with template 'alpaca_zh', not 'alpaca'"]
    capped = json.loads(out.read_text(encoding="utf-8"))
    assert capped["template"] == "alpaca" and all(s["before_tokens"] == 4 for s in capped["samples"])


def test_the_template_and_base_name_travel_with_the_adapters(run):
    assert read_provenance(run / "out").template == TEMPLATE
    assert read_provenance(run / "out" / "lora.safetensors").base_model == "org/tiny-base"
    assert json.loads((run / "out" / "train_config.json").read_text())["template"] == TEMPLATE
    peft = json.loads((run / "out" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == "org/tiny-base"
    latest = (run / "out" / "checkpoints" / "latest").read_text().strip()
    assert read_provenance(run / "out" / "checkpoints" / latest).template == TEMPLATE
