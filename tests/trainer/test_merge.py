"""Merging: the merged checkpoint computes what base + adapters compute, in the base's layout,
and adapters are folded in exactly once."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer import generate
from trainer.checkpoint import CONFIG, TOKENIZER, load_model, save_model
from trainer.lora import (
    AdapterError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from trainer.merge import main
from trainer.model import Config, LLaMA

pytestmark = pytest.mark.unit

LORA = LoRAConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "mlp", "head"))


def tiny(vocab_size: int, n_embd: int = 32) -> LLaMA:
    config = Config(
        vocab_size=vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=n_embd,
        intermediate_size=64,
        max_seq_len=64,
    )
    return LLaMA(config)


def adapters(model: LLaMA, out: Path, seed: int = 1) -> Path:
    """Random non-zero adapters for `model`, saved in `out`."""
    apply_lora(model, LORA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.05, generator=generator)
    out.mkdir()
    return save_adapters(model, LORA, out)


@pytest.fixture
def files(tokenizer, tmp_path) -> tuple[Path, Path]:
    """A base checkpoint and adapters for it."""
    torch.manual_seed(0)
    model = tiny(tokenizer.vocab_size)
    save_model(model, tmp_path / "base")
    shutil.copyfile(tokenizer.path, tmp_path / "base" / TOKENIZER)
    return tmp_path / "base", adapters(model, tmp_path / "run")


def merge(checkpoint: Path, lora: Path, out: Path, capsys) -> tuple[int, str, str]:
    code = main(["--checkpoint", str(checkpoint), "--lora", str(lora), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@torch.no_grad()
def logits(model: LLaMA) -> torch.Tensor:
    idx = torch.arange(40).view(2, 20) * 7 % model.config.vocab_size
    return model.eval()(idx)


def test_merged_checkpoint_computes_base_plus_adapters(files, tmp_path, capsys):
    base, lora = files
    code, out, _ = merge(base, lora, tmp_path / "merged", capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["merged_modules"] == 2 * 7 + 1 and LoRAConfig.from_dict(summary["lora_config"]) == LORA

    merged, _ = load_model(tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    adapted, _ = load_model(base)
    load_adapters(adapted, lora)
    plain, _ = load_model(base)
    expected = logits(adapted)
    assert (logits(plain) - expected).abs().max().item() > 1e-2  # the adapters matter
    assert (logits(merged) - expected).abs().max().item() <= 1e-5


def test_merged_checkpoint_has_the_base_layout(files, tmp_path, capsys):
    base, lora = files
    merge(base, lora, tmp_path / "merged", capsys)
    assert (tmp_path / "merged" / CONFIG).read_text() == (base / CONFIG).read_text()
    assert (tmp_path / "merged" / TOKENIZER).read_bytes() == (base / TOKENIZER).read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left

    code, out, err = merge(base, lora, tmp_path / "merged", capsys)
    assert (code, out) == (2, "") and err.startswith("error: ") and "already exists" in err


def test_generation_with_adapters_equals_the_merged_checkpoint(files, tmp_path, capsys):
    base, lora = files
    merge(base, lora, tmp_path / "merged", capsys)

    def tokens(*argv: str) -> list[int]:
        assert (
            generate.main(["--prompt", "计算 3 加 4 等于多少。", "--temperature", "0", "--json", *argv]) == 0
        )
        return json.loads(capsys.readouterr().out)["token_ids"]

    with_lora = tokens("--checkpoint", str(base), "--lora", str(lora))
    assert with_lora == tokens("--checkpoint", str(tmp_path / "merged"))
    assert with_lora != tokens("--checkpoint", str(base))


def test_adapters_are_merged_once():
    torch.manual_seed(0)
    model = tiny(50)
    apply_lora(model, LORA)
    with torch.no_grad():
        model.layers[0].attention.wq.lora_b.fill_(0.1)
    before = logits(model)
    model.train()
    model.eval()  # switching modes neither merges nor unmerges
    assert isinstance(model.layers[0].attention.wq, LoRALinear)
    assert torch.equal(logits(model), before)

    merge_lora(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)  # nothing left to merge
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)


def test_adapters_for_another_model_are_refused(files, tokenizer, tmp_path, capsys):
    base, _ = files
    other = adapters(tiny(tokenizer.vocab_size, n_embd=64), tmp_path / "other")
    code, out, err = merge(base, other, tmp_path / "merged", capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: LoRA adapters do not fit the model: wrong shape") and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()
    with pytest.raises(AdapterError):
        load_adapters(load_model(base)[0], other)
