"""Packed rows: several samples end to end in one row, attention confined to each sample and
positions restarting, compute the same loss and LoRA gradients as the samples padded one a row."""

import pytest
import torch

from tests.trainer.test_resume import tiny_config, write_tiny_inputs
from trainer.batching import BatchSampler, collate, loss_on, pack, padding_fraction
from trainer.finetune import train
from trainer.lora import LoRAConfig, apply_lora
from trainer.model import Config, LLaMA

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


def samples(lengths: list[int], seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, 64, (n,), generator=generator)
        labels = ids.clone()
        labels[: n // 3] = -100  # a prompt without loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def adapted_model() -> LLaMA:
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
    model = apply_lora(
        LLaMA(Config(vocab_size=64, **shape)), LoRAConfig(r=4, dropout=0.0, targets=("q", "v", "mlp"))
    )
    with torch.no_grad():  # adapters that already change the output, so their gradients all matter
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0, 0.1)
    return model


def loss_and_grads(model: LLaMA, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_on(model, batch, CPU, reduction="sum")
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_and_padded_rows_give_the_same_loss_and_lora_gradients():
    model, rows = adapted_model(), samples([5, 9, 17, 12, 3, 20, 30])
    padded = collate(rows)
    packed = collate([rows[:3], rows[3:5], rows[5:]], length=52)
    assert packed.inputs.shape == (3, 52) and padded.inputs.shape == (7, 29)
    assert packed.tokens == padded.tokens
    assert packed.position_ids[0, :4].tolist() == [0, 1, 2, 3] and packed.position_ids[0, 4] == 0
    assert packed.document_ids[1, -1] == -1  # padding belongs to no sample
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == packed_grads.keys() and len(grads) == 2 * 2 * 5  # 2 layers x (q, v, w1-3)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-5, atol=1e-6)


def test_a_sample_never_sees_or_predicts_its_neighbour():
    rows = samples([6, 6])
    packed = collate([rows], length=10)
    assert packed.targets[0, 4] == rows[0]["labels"][-1]  # the first sample's last target
    assert packed.targets[0, 5] == rows[1]["labels"][1]  # not the next sample's first token
    model = adapted_model().eval()
    alone = model(collate([rows[1]]).inputs)
    together = model(packed.inputs, position_ids=packed.position_ids, document_ids=packed.document_ids)
    torch.testing.assert_close(together[0, 5:10], alone[0], rtol=1e-5, atol=1e-5)


def test_packed_epochs_hold_every_sample_once_in_nearly_full_rows():
    lengths = torch.randint(8, 200, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = BatchSampler(lengths, 4, seed=1, length_grouped=False, pack_capacity=256)
    batches, seen = [], 0
    while seen < len(lengths):
        batches.append(sampler.next())
        seen += sum(len(row) for row in batches[-1])
    assert sorted(i for batch in batches for row in batch for i in row) == list(range(600))
    assert all(sum(lengths[i] - 1 for i in row) <= 256 for batch in batches for row in batch)
    assert padding_fraction(batches, lengths, 256) < 0.03
    unpacked = BatchSampler(lengths, 4, seed=1, length_grouped=False)
    assert padding_fraction([unpacked.next() for _ in range(150)], lengths) > 0.3


def test_packed_sampler_state_round_trips_mid_epoch():
    lengths = list(range(2, 82))
    sampler = BatchSampler(lengths, 2, seed=3, length_grouped=False, pack_capacity=100)
    for _ in range(30):  # into the second epoch
        sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(40)]
    restored = BatchSampler(lengths, 2, seed=99, length_grouped=False, pack_capacity=100)
    restored.load_state_dict(state)
    assert [restored.next() for _ in range(40)] == expected


def test_best_fit_fills_rows_and_refuses_a_sample_too_long():
    assert pack([0, 1, 2, 3], [6, 5, 4, 1], capacity=10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="does not fit packed rows of 8"):
        BatchSampler([4, 12], 1, seed=0, length_grouped=False, pack_capacity=8)


def test_packed_training_learns(tmp_path):
    inputs = write_tiny_inputs(tmp_path, train_size=64)
    summary = train(tiny_config(inputs, tmp_path / "out", max_steps=12, pack=True, lr=3e-3), lambda _: None)
    assert summary["padding"] < 0.2
    assert summary["final_loss"] < summary["first_loss"]
