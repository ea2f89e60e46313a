"""Sample answers before and after fine-tuning: the same prompts, greedy, base then adapters."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import tiny_config
from trainer.checkpoint import TOKENIZER, load_model, save_model
from trainer.lora import LoRAConfig, apply_lora, save_adapters
from trainer.model import LLaMA
from trainer.samples import DEFAULT_PROMPTS, main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples-base")
    torch.manual_seed(0)
    save_model(LLaMA(tiny_config(tokenizer.vocab_size, max_seq_len=128)), out)
    shutil.copyfile(tokenizer.path, out / TOKENIZER)
    return out


def adapters(checkpoint: Path, folder: Path, scale: float) -> Path:
    """Adapters whose B matrices are `scale` times random (0: adapters that change nothing)."""
    model, _ = load_model(checkpoint)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "head"))
    apply_lora(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.copy_(torch.randn_like(parameter) * scale)
    folder.mkdir()
    return save_adapters(model, config, folder)


def test_answers_before_and_after_the_adapters_side_by_side(checkpoint, tmp_path):
    lora = adapters(checkpoint, tmp_path / "strong", scale=5.0)
    out = tmp_path / "samples.json"
    argv = ["--checkpoint", str(checkpoint), "--lora", str(lora), "--out", str(out), "--max-new-tokens", "8"]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert [s["prompt"] for s in result["samples"]] == list(DEFAULT_PROMPTS)
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in result["samples"])
    assert any(s["before"] != s["after"] for s in result["samples"])  # the adapters change answers
    assert main(argv) == 0 and json.loads(out.read_text(encoding="utf-8")) == result  # greedy: repeatable


def test_zero_adapters_answer_as_the_base_does(checkpoint, tmp_path):
    lora = adapters(checkpoint, tmp_path / "zero", scale=0.0)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["你好", "介绍一下杭州。"], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "samples.json"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--lora",
        str(lora),
        "--out",
        str(out),
        "--prompts",
        str(prompts),
    ]
    assert main([*argv, "--max-new-tokens", "6"]) == 0
    samples = json.loads(out.read_text(encoding="utf-8"))["samples"]
    assert [s["prompt"] for s in samples] == ["你好", "介绍一下杭州。"]
    assert all(s["before"] == s["after"] for s in samples)


def test_bad_prompts_file_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"not": "a list"}', encoding="utf-8")
    argv = ["--checkpoint", str(checkpoint), "--lora", str(tmp_path), "--out", str(tmp_path / "x.json")]
    assert main([*argv, "--prompts", str(prompts)]) == 2
    assert capsys.readouterr().err == f"error: {prompts} must hold a JSON list of non-empty strings\n"
