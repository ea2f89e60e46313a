"""LoRA: a zero update is a no-op, merging is exact, only adapters are saved and trained, and
saved adapters load back only into the model they fit."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.lora import (
    ADAPTER_FILE,
    AdapterError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_trainable,
    load_adapters,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    read_adapters,
    save_adapters,
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
    with pytest.raises(AdapterError, match="unexpected x.lora_a"):
        load_lora_state_dict(target, {**lora_state_dict(source), "x.lora_a": torch.zeros(1)})
    wrong = {**lora_state_dict(source), "layers.1.attention.wv.lora_b": torch.zeros(16, 3)}
    with pytest.raises(AdapterError, match=r"wrong shape layers.1.attention.wv.lora_b \(16, 3\)"):
        load_lora_state_dict(target, wrong)


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


def test_saved_adapters_load_into_a_fresh_model(tmp_path):
    lora = LoRAConfig(r=4, alpha=8, targets=("q", "k", "o", "head"))
    base, source = base_and_lora(lora)
    randomize_b(source)
    path = save_adapters(source, lora, tmp_path)
    assert path == tmp_path / ADAPTER_FILE

    assert load_adapters(base, tmp_path) == lora  # a run's folder works as well as the file
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(idx), source(idx), atol=0, rtol=0)


def test_adapter_file_is_reproducible_with_one_metadata_key(tmp_path):
    _, source = base_and_lora(LoRAConfig())
    randomize_b(source)
    (tmp_path / "a").mkdir()
    first = save_adapters(source, LoRAConfig(), tmp_path / "a")
    second = save_adapters(source, LoRAConfig(), tmp_path)
    assert first.read_bytes() == second.read_bytes()
    with safe_open(first, framework="pt") as adapters:
        metadata = adapters.metadata()
    assert list(metadata) == ["lora_config"]
    assert json.loads(metadata["lora_config"])["targets"] == ["q", "v"]


def test_adapters_that_do_not_fit_leave_the_model_alone(tmp_path):
    _, source = base_and_lora(LoRAConfig(targets=("q", "mlp")))
    save_adapters(source, LoRAConfig(targets=("q", "mlp")), tmp_path)
    other = LLaMA(Config(vocab_size=50, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48))
    with pytest.raises(AdapterError) as err:
        load_adapters(other, tmp_path / ADAPTER_FILE)
    message = str(err.value)
    assert "unexpected layers.1.attention.wq.lora_a" in message
    assert "wrong shape layers.0.feed_forward.w1.lora_b (64, 8) (model needs (48, 8))" in message
    assert not any(isinstance(m, LoRALinear) for m in other.modules())

    adapted = apply_lora(LLaMA(CONFIG), LoRAConfig(targets=("q", "mlp")))
    with pytest.raises(AdapterError, match="applied twice"):
        load_adapters(adapted, tmp_path / ADAPTER_FILE)


def test_unreadable_adapter_files_are_reported(tmp_path):
    with pytest.raises(AdapterError, match="cannot read"):
        read_adapters(tmp_path / "missing.safetensors")
    save_file({"layers.0.attention.wq.lora_a": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterError, match="no lora_config metadata"):
        read_adapters(tmp_path / "plain.safetensors")
    meta = {"lora_config": json.dumps({"r": 0, "targets": ["q"]})}
    save_file({"x": torch.zeros(1)}, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(AdapterError, match="unusable lora_config"):
        read_adapters(tmp_path / "bad.safetensors")
