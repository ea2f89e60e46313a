"""LoRA: a zero update is a no-op, merging is exact, and only adapters are saved and trained."""

import pytest
import torch
import torch.nn as nn

from trainer.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from trainer.model import Config, LLaMA

pytestmark = pytest.mark.unit

CONFIG = Config(
    vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=32
)


def base_and_lora(lora: LoRAConfig) -> tuple[LLaMA, LLaMA]:
    torch.manual_seed(0)
    base = LLaMA(CONFIG).eval()
    adapted = LLaMA(CONFIG)
    adapted.load_state_dict(base.state_dict())
    return base, apply_lora(adapted, lora).eval()


def randomize_b(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.1)


def test_zero_b_gives_the_base_model():
    base, adapted = base_and_lora(LoRAConfig(targets=("q", "k", "v", "o", "mlp", "head")))
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(adapted(idx), base(idx), atol=0, rtol=0)


def test_merge_gives_the_same_outputs_as_the_adapted_model():
    _, adapted = base_and_lora(LoRAConfig(targets=("q", "v", "mlp", "head")))
    randomize_b(adapted)
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = adapted(idx)
        merged = merge_lora(adapted)
        after = merged(idx)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert isinstance(merged.layers[0].attention.wq, nn.Linear)
    assert set(merged.state_dict()) == set(LLaMA(CONFIG).state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_only_adapters_are_trainable_and_saved():
    _, adapted = base_and_lora(LoRAConfig(r=4, targets=("q", "v")))
    state = lora_state_dict(adapted)
    assert set(state) == {
        f"layers.{i}.attention.{w}.lora_{ab}" for i in (0, 1) for w in ("wq", "wv") for ab in "ab"
    }
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in trainable)
    assert count_trainable(adapted) == sum(t.numel() for t in state.values())
    # q: 32 -> 32 and v: 32 -> 16 (two kv heads of 8), rank 4, two layers
    assert count_trainable(adapted) == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)


def test_lora_state_dict_loads_back_and_rejects_other_keys():
    _, source = base_and_lora(LoRAConfig())
    randomize_b(source)
    _, target = base_and_lora(LoRAConfig())
    load_lora_state_dict(target, lora_state_dict(source))
    for key, value in lora_state_dict(target).items():
        assert torch.equal(value, lora_state_dict(source)[key])
    with pytest.raises(KeyError, match="unexpected"):
        load_lora_state_dict(target, {**lora_state_dict(source), "x.lora_a": torch.zeros(1)})


def test_scale_and_init():
    layer = LoRALinear(nn.Linear(16, 8, bias=False), r=4, alpha=16, dropout=0.0)
    assert layer.scale == 4.0
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.lora_a) > 0
    assert not layer.base.weight.requires_grad


@pytest.mark.parametrize("bad", [dict(r=0), dict(targets=("q", "lm_head")), dict(targets=())])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        LoRAConfig(**bad)


def test_config_round_trip():
    config = LoRAConfig(r=16, alpha=32, dropout=0.1, targets=("q", "k", "head"))
    assert LoRAConfig.from_dict(config.to_dict()) == config
