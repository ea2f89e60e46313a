"""The memory plan behind --activation-checkpointing auto: what a block keeps for backward is
measured, the whole model's saved activations follow from it, and auto picks the fewest
checkpointed blocks that fit the budget."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.test_resume import tiny_config, write_tiny_inputs
from trainer.devices import DeviceError, Dist
from trainer.finetune import setup, train
from trainer.lora import LoRAConfig, apply_lora
from trainer.memory import MemoryBudgetError, plan, saved_bytes
from trainer.model import Config, LLaMA

pytestmark = pytest.mark.unit
CPU = Dist(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def model() -> LLaMA:
    torch.manual_seed(0)
    shape = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, max_seq_len=128)
    return apply_lora(LLaMA(Config(vocab_size=300, **shape)), LoRAConfig(r=4, targets=("q", "v"))).train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_whole_models_saved_activations_follow_from_one_measured_block(model, dtype):
    model.to(dtype).init_rope()
    estimate = plan(model, micro_batch_size=2, seq_len=96, packed=False)
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    idx, targets = torch.randint(0, 300, (2, 96)), torch.randint(0, 300, (2 * 96,))

    def loss(tokens):
        return F.cross_entropy(model(tokens).flatten(0, 1).float(), targets, reduction="sum")

    assert estimate.per_checkpointed_layer == 2 * 96 * 64 * torch.tensor([], dtype=dtype).element_size()
    for k in (0, 2, 4):
        model.checkpointed_layers = k
        measured = saved_bytes(loss, idx, exclude=weights)
        kept = (4 - k) * estimate.per_layer + k * estimate.per_checkpointed_layer + estimate.head
        # Exact, except that the first block saves less: its input (the frozen embedding's
        # output) needs no gradient. The estimate errs on the safe side.
        assert kept * 0.9 <= measured <= kept
        assert measured == kept or k < 1
    model.checkpointed_layers = 0
    assert [estimate.peak(k) for k in range(5)] == sorted((estimate.peak(k) for k in range(5)), reverse=True)


def test_auto_checkpoints_the_fewest_blocks_that_fit_and_says_so(tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    lines: list[str] = []
    probe = setup(tiny_config(inputs, tmp_path / "probe", activation_checkpointing="off"), CPU, None, print)
    estimate = plan(probe.model, 4, 38, packed=False)  # the longest tiny sample: 39 tokens
    between = (estimate.peak(1) + estimate.peak(2)) / 2 / 2**30
    cfg = tiny_config(inputs, tmp_path / "auto", activation_checkpointing="auto", memory_budget_gib=between)
    assert setup(cfg, CPU, None, lines.append).model.checkpointed_layers == 2
    assert any(line.startswith("activation checkpointing: 2 of 2 blocks") for line in lines)
    roomy = tiny_config(inputs, tmp_path / "roomy", activation_checkpointing="auto", memory_budget_gib=64)
    assert setup(roomy, CPU, None, lines.append).model.checkpointed_layers == 0
    plain = train(tiny_config(inputs, tmp_path / "plain", max_steps=3, save_interval=0), lambda _: None)
    auto = train(replace(cfg, max_steps=3, save_interval=0), lambda _: None)
    assert auto["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)


def test_a_budget_nothing_fits_and_auto_without_one_on_a_cpu_are_one_line_errors(tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    tight = tiny_config(inputs, tmp_path / "a", activation_checkpointing="auto", memory_budget_gib=0.001)
    with pytest.raises(MemoryBudgetError, match="even with every block checkpointed the run needs about"):
        setup(tight, CPU, None, lambda _: None)
    with pytest.raises(DeviceError, match="auto on a CPU needs --memory-budget-gib"):
        setup(tiny_config(inputs, tmp_path / "b", activation_checkpointing="auto"), CPU, None, lambda _: None)
