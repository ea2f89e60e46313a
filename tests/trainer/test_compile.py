"""--compile (torch.compile of each block) trains to the same loss as eager PyTorch."""

import pytest
import torch

from tests.trainer.test_resume import tiny_config, write_tiny_inputs
from trainer.finetune import train

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compiled_blocks_give_the_eager_loss(tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    # Packed rows keep the shapes fixed (one compilation); no dropout, whose random stream a
    # compiled graph draws differently.
    settings = dict(max_steps=4, save_interval=0, lora_dropout=0.0, pack=True, eval_samples=0)
    eager = train(tiny_config(inputs, tmp_path / "eager", **settings), lambda _: None)
    compiled = train(tiny_config(inputs, tmp_path / "compiled", compile=True, **settings), lambda _: None)
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-4)
    assert compiled["first_loss"] == pytest.approx(eager["first_loss"], abs=1e-4)
