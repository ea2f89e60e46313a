"""Evaluation: a token-weighted loss over the held-out targets, and the base/LoRA comparison."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.conftest import tiny_config
from trainer.batching import collate, loss_on
from trainer.checkpoint import TOKENIZER, load_model, save_model
from trainer.data import IGNORE_INDEX
from trainer.evaluate import batches, evaluate, main
from trainer.lora import LoRAConfig, apply_lora, save_adapters
from trainer.model import Config, LLaMA
from trainer.prepare import PrepareConfig, prepare

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workspace(records_file, tokenizer, tmp_path_factory) -> Path:
    """A random base checkpoint and data prepared for it."""
    root = tmp_path_factory.mktemp("evaluate")
    prepare(PrepareConfig(records_file, tokenizer.path, root / "data", max_seq_length=128, test_size=20))
    torch.manual_seed(0)
    config = tiny_config(tokenizer.vocab_size, max_seq_len=128)
    save_model(LLaMA(config), root / "base")
    shutil.copyfile(tokenizer.path, root / "base" / TOKENIZER)
    return root


def rows(workspace: Path, split: str) -> list[dict]:
    return torch.load(workspace / "data" / f"{split}.pt", weights_only=True)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_loss_is_the_mean_over_all_target_tokens(workspace):
    model, _ = load_model(workspace / "base")
    test = rows(workspace, "test")
    with torch.no_grad():
        total = sum(
            F.cross_entropy(model(row["input_ids"][None, :-1])[0], row["labels"][1:], reduction="sum").item()
            for row in test
        )
    tokens = sum(int((row["labels"][1:] != IGNORE_INDEX).sum()) for row in test)

    for size in (1, 3, 8):  # padding and batch boundaries do not change the result
        scores = evaluate(model, batches(test, size), CPU)
        assert scores["tokens"] == tokens
        assert scores["loss"] == pytest.approx(total / tokens, rel=1e-5)
        assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-12)


def test_max_batches_takes_the_first_micro_batches(workspace):
    test = rows(workspace, "test")
    assert len(batches(test, 8)) == 3
    (first,) = batches(test, 8, max_batches=1)
    assert torch.equal(first.inputs, collate(test[:8]).inputs)


def test_zero_adapters_leave_the_loss_unchanged(workspace, tmp_path, capsys):
    model, _ = load_model(workspace / "base")
    save_adapters(
        apply_lora(model, LoRAConfig(targets=("q", "v", "mlp"))),
        LoRAConfig(targets=("q", "v", "mlp")),
        tmp_path,
    )
    argv = ["--checkpoint", str(workspace / "base"), "--data-dir", str(workspace / "data")]
    code, out, _ = run([*argv, "--lora", str(tmp_path), "--micro-batch-size", "4", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    endings = {"answers", "eos_share", "answer_tokens_mean", "reference_tokens_mean"}
    assert set(result) == {"base", "lora"}
    assert set(result["base"]) == {"loss", "perplexity", "tokens", *endings}
    assert result["lora"] == result["base"]

    code, out, err = run([*argv, "--max-batches", "1"], capsys)
    assert (code, out) == (0, "") and err.startswith("base: loss ")


def test_trained_adapters_lower_the_held_out_loss(workspace, tmp_path, capsys):
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0, targets=("q", "v", "head"))
    model, _ = load_model(workspace / "base")
    apply_lora(model, lora).train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train = rows(workspace, "train")
    for step in range(30):
        loss = loss_on(model, collate(train[8 * step : 8 * step + 8]), CPU)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapters(model, lora, tmp_path)

    argv = ["--checkpoint", str(workspace / "base"), "--data-dir", str(workspace / "data"), "--json"]
    code, out, _ = run([*argv, "--lora", str(tmp_path / "lora.safetensors")], capsys)
    result = json.loads(out)
    assert code == 0 and result["lora"]["tokens"] == result["base"]["tokens"]
    assert result["lora"]["loss"] < result["base"]["loss"] - 1.0
    code, out, _ = run(argv, capsys)
    assert json.loads(out) == {"base": result["base"], "lora": None}


def test_bad_input_exits_2(workspace, tmp_path, capsys):
    code, out, err = run(["--checkpoint", str(workspace / "base"), "--data-dir", str(tmp_path)], capsys)
    assert (code, out) == (2, "") and err.startswith("error: ") and "test.pt not found" in err

    other = apply_lora(LLaMA(Config(vocab_size=11, n_layer=1, n_head=2, n_kv_head=2, n_embd=8)), LoRAConfig())
    save_adapters(other, LoRAConfig(), tmp_path)
    argv = [
        "--checkpoint",
        str(workspace / "base"),
        "--data-dir",
        str(workspace / "data"),
        "--lora",
        str(tmp_path),
    ]
    code, _, err = run(argv, capsys)
    assert code == 2 and "do not fit" in err and err.count("\n") == 1
