"""Checks only a CUDA GPU can run (bench/gpu_check.sh runs them first): packed rows on the GPU's
attention kernels, compiled blocks, and a training step that waits for the GPU at most once.
Skipped where torch sees no GPU."""

import warnings

import pytest
import torch

from tests.trainer.test_packing import adapted_model, loss_and_grads, samples
from tests.trainer.test_resume import tiny_config, write_tiny_inputs
from trainer.batching import collate
from trainer.devices import Dist
from trainer.finetune import setup, train, train_step

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU = torch.device("cuda")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_packed_rows_match_padded_ones_on_the_gpu(dtype, rtol):
    model = adapted_model().to(GPU, dtype)
    model.init_rope()
    rows = samples([5, 9, 17, 12, 3, 20, 30])
    loss, grads = loss_and_grads(model, collate(rows))
    packed_loss, packed_grads = loss_and_grads(model, collate([rows[:3], rows[3:5], rows[5:]], length=52))
    assert packed_loss == pytest.approx(loss, rel=rtol)
    for name in grads:
        torch.testing.assert_close(packed_grads[name].float(), grads[name].float(), rtol=rtol, atol=rtol)


def test_a_training_step_waits_for_the_gpu_at_most_once(tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    run = setup(
        tiny_config(inputs, tmp_path / "out", device="cuda", eval_samples=0), Dist(0, 1, GPU), None, print
    )
    train_step(run, 1, False)  # the first step allocates and warms up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(run, 2, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_compiled_blocks_give_the_eager_loss_on_the_gpu(tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    settings = dict(max_steps=4, save_interval=0, lora_dropout=0.0, pack=True, eval_samples=0, device="cuda")
    eager = train(tiny_config(inputs, tmp_path / "eager", precision="fp32", **settings), lambda _: None)
    compiled = train(
        tiny_config(inputs, tmp_path / "compiled", precision="fp32", compile=True, **settings), print
    )
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-3)
